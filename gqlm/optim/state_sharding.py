"""Optimizer-state shardings derived from the parameters' shardings.

`optax.tree_map_params` finds the copies of the parameter tree inside the state (for chains and
multi_transform groups too: another group's parameters are `optax.MaskedNode`s there) and hands
each state leaf its parameter. Then: a leaf shaped like its parameter takes the parameter's spec;
one with size-1 dims (Adalayer) or one dim dropped (Adafactor's factored moments) keeps the specs
of the dims it kept; SOAP statistics (rows) and eigenbases (columns) are split over every mesh
axis that divides them, whatever the parameter's sharding, and the second moment (kept in the
eigenbasis) is split along the dimension the step keeps split: the layouts SOAP's per-step math
works in (`soap_split`); a data-parallel mesh shares them too. Under `max_precond_block` the
statistics and bases of a parameter's blocks are stacked on a leading block axis, split first
(whole blocks per device, `soap_split.block_axes`), and its second moment keeps the parameter's
spec. Everything else (counts) is replicated. Mesh axes that do not divide a dimension are
dropped (`mesh.fit_spec`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gqlm.mesh import fit_spec
from gqlm.optim.soap import Preconditioner, ScaleBySoapState
from gqlm.optim.soap_blocks import BlockedPreconditioner
from gqlm.optim.soap_split import basis_spec, rotated_spec, stacked_spec, statistic_spec


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


def _precond_shardings(pc: Preconditioner | BlockedPreconditioner, mesh: Mesh) -> Any:
    if isinstance(pc, BlockedPreconditioner):
        return BlockedPreconditioner(parts=tuple(_precond_shardings(p, mesh) for p in pc.parts), regions=pc.regions)

    def one(x, spec_of):
        return None if x is None else NamedSharding(mesh, stacked_spec(spec_of, x.shape, mesh))
    return Preconditioner(stats=tuple(one(x, statistic_spec) for x in pc.stats),
                          bases=tuple(one(x, basis_spec) for x in pc.bases), dims=pc.dims)


def _param_leaf_sharding(leaf: Any, param: jax.ShapeDtypeStruct, sharding: NamedSharding,
                         mesh: Mesh) -> Any:
    """Sharding of one state leaf that tree_map_params pairs with `param`."""
    if isinstance(leaf, optax.MaskedNode):  # the parameter belongs to another group
        return leaf
    if isinstance(leaf, (Preconditioner, BlockedPreconditioner)):
        return _precond_shardings(leaf, mesh)
    spec = tuple(sharding.spec) + (None,) * (len(param.shape) - len(sharding.spec))
    derived = _derived_spec(tuple(leaf.shape), tuple(param.shape), spec) if leaf.shape else None
    return NamedSharding(mesh, fit_spec(P() if derived is None else derived, leaf.shape, mesh))


def _with_rotated_nu(shardings: Any, abstract_state: Any, mesh: Mesh) -> Any:
    """SOAP's nu resharded to the eigenbasis layout of its parameter's Preconditioner."""
    def nu_sharding(nu, pc, default):
        if isinstance(pc, BlockedPreconditioner):
            return default
        spec = rotated_spec(nu.shape, pc.dims, [st is not None for st in pc.stats], mesh)
        return default if spec is None else NamedSharding(mesh, spec)

    def fix(node, abstract):
        if not isinstance(node, ScaleBySoapState):
            return node
        return node._replace(nu=jax.tree.map(nu_sharding, abstract.nu, abstract.precond, node.nu))

    return jax.tree.map(fix, shardings, abstract_state, is_leaf=lambda x: isinstance(x, ScaleBySoapState))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
    """Tree of NamedSharding matching `jax.eval_shape(tx.init, abstract_params)`."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    shardings = optax.tree_map_params(
        tx, lambda leaf, p, s: _param_leaf_sharding(leaf, p, s, mesh),
        abstract_state, abstract_params, param_shardings,
        transform_non_params=lambda x: NamedSharding(mesh, fit_spec(P(), x.shape, mesh)),
        is_leaf=lambda x: isinstance(x, (optax.MaskedNode, Preconditioner, BlockedPreconditioner)))
    # tree_map_params cannot tell SOAP's nu from its mu (both parameter copies), and nu's layout
    # needs the same parameter's Preconditioner, a sibling field: so nu is fixed up afterwards.
    return _with_rotated_nu(shardings, abstract_state, mesh)
