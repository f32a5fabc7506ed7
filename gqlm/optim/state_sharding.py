"""Optimizer-state shardings derived from the parameters' shardings.

Every optax state leaf that belongs to a parameter sits under that parameter's dict keys (for
multi_transform and chains too), so the owner is the longest param path that is a suffix of the
leaf's dict keys. Then: a leaf shaped like its parameter takes the parameter's spec; one with
size-1 dims (Adalayer) or one dim dropped (Adafactor's factored moments) keeps the specs of the
dims it kept; SOAP statistics and eigenbases of (merged) dim k are sharded, along their rows,
over the mesh axes of the parameter dims merged into k. Everything else (counts) is replicated.
Mesh axes that do not divide a dimension are dropped (`mesh.fit_spec`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gqlm.mesh import fit_spec
from gqlm.optim.adalayer import path_str
from gqlm.optim.soap import Preconditioner


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _entry(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else (axes or None)


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

    def precond_shardings(pc: Preconditioner, param_spec: tuple) -> Preconditioner:
        every_axis = sum((_axes(e) for e in param_spec), ())

        def one(k, x):
            if x is None:
                return None
            # A dimension the parameter does not shard still gets its rows split, over the
            # parameter's other axes: an fsdp-sharded matrix never has a replicated statistic.
            axes = sum((_axes(param_spec[i]) for i in pc.dims[k]), ()) or every_axis
            return named(P(_entry(axes), None), x.shape)
        return Preconditioner(stats=tuple(one(k, x) for k, x in enumerate(pc.stats)),
                              bases=tuple(one(k, x) for k, x in enumerate(pc.bases)), dims=pc.dims)

    def leaf_sharding(path, leaf):
        found = owner(path)
        if isinstance(leaf, Preconditioner):
            if found is None:
                return jax.tree.map(lambda x: named(P(), x.shape), leaf)
            return precond_shardings(leaf, found[1])
        if found is None or not leaf.shape:
            return named(P(), leaf.shape)
        spec = _derived_spec(tuple(leaf.shape), *found)
        return named(spec if spec is not None else P(), leaf.shape)

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state,
                                            is_leaf=lambda x: isinstance(x, Preconditioner))
