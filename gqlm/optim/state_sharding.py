"""Optimizer-state shardings derived from the parameters' shardings.

Every optax state leaf that belongs to a parameter sits under that parameter's dict keys (for
multi_transform and chains too), so the owner is the longest param path that is a suffix of the
leaf's dict keys. Then: a leaf shaped like its parameter takes the parameter's spec; one with
size-1 dims (Adalayer) or one dim dropped (Adafactor's factored moments) keeps the specs of the
dims it kept; SOAP statistics (rows) and eigenbases (columns) are split over every mesh axis that
divides them, whatever the parameter's sharding, and the second moment (kept in the eigenbasis)
is split along the dimension the step keeps split: the layouts SOAP's per-step math works in
(`soap_split`); a data-parallel mesh shares them too. Everything else (counts) is replicated.
Mesh axes that do not divide a dimension are dropped (`mesh.fit_spec`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gqlm.mesh import fit_spec
from gqlm.optim.adalayer import path_str
from gqlm.optim.soap import Preconditioner, ScaleBySoapState
from gqlm.optim.soap_split import basis_spec, rotated_spec, statistic_spec


def _derived_spec(shape: tuple[int, ...], param_shape: tuple[int, ...], spec: tuple) -> P | None:
    if shape == param_shape:
        return P(*spec)
    if len(shape) == len(param_shape) and all(s in (1, p) for s, p in zip(shape, param_shape)):
        return P(*(e if s == p else None for s, p, e in zip(shape, param_shape, spec)))
    if len(shape) == len(param_shape) - 1:
        for i in range(len(param_shape)):
            if shape == param_shape[:i] + param_shape[i + 1:]:
                return P(*(spec[:i] + spec[i + 1:]))
    return None


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
    """Tree of NamedSharding matching `jax.eval_shape(tx.init, abstract_params)`."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    owners = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, leaf), sharding in zip(flat_params, jax.tree.leaves(param_shardings)):
        spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
        owners[path_str(path)] = (tuple(leaf.shape), spec)

    def owner(path):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for i in range(len(keys)):
            found = owners.get("/".join(keys[i:]))
            if found:
                return found
        return None

    def named(spec: P, shape) -> NamedSharding:
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))

    def precond_shardings(pc: Preconditioner) -> Preconditioner:
        def one(x, spec_of):
            return None if x is None else NamedSharding(mesh, spec_of(x.shape[0], mesh))
        return Preconditioner(stats=tuple(one(x, statistic_spec) for x in pc.stats),
                              bases=tuple(one(x, basis_spec) for x in pc.bases), dims=pc.dims)

    def leaf_sharding(path, leaf):
        found = owner(path)
        if isinstance(leaf, Preconditioner):
            return precond_shardings(leaf)
        if found is None or not leaf.shape:
            return named(P(), leaf.shape)
        spec = _derived_spec(tuple(leaf.shape), *found)
        return named(spec if spec is not None else P(), leaf.shape)

    def is_node(x):
        return isinstance(x, (Preconditioner, ScaleBySoapState))

    def node_sharding(path, node):
        if not isinstance(node, ScaleBySoapState):
            return leaf_sharding(path, node)
        fields = {f: jax.tree_util.tree_map_with_path(
            lambda p, x, f=f: leaf_sharding(path + (jax.tree_util.GetAttrKey(f),) + p, x),
            getattr(node, f), is_leaf=is_node) for f in node._fields}

        def nu_sharding(nu, pc, default):  # nu lives in the eigenbasis, split like the step keeps it
            spec = rotated_spec(nu.shape, pc.dims, [st is not None for st in pc.stats], mesh)
            return default if spec is None else NamedSharding(mesh, spec)
        fields["nu"] = jax.tree.map(nu_sharding, node.nu, node.precond, fields["nu"])
        return ScaleBySoapState(**fields)

    return jax.tree_util.tree_map_with_path(node_sharding, abstract_state, is_leaf=is_node)
