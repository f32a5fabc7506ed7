"""SOAP (Vyas et al., 2024): Adam run in the eigenbasis of Shampoo's preconditioner.

Follows the paper's official PyTorch implementation step by step. For a 2-D gradient G with
Shampoo statistics L, R and eigenbases Q_L, Q_R (one pair per parameter):

  call 0      L, R = (1-sb) G G^T, (1-sb) G^T G;  Q = eigh(.) sorted by descending eigenvalue;
              update = 0, step counter t stays 0 (the current gradient is never used to project
              itself).
  call t>=1   m = b1 m + (1-b1) G                       (m lives in the ORIGINAL space, see below)
              v = b2 v + (1-b2) (Q_L^T G Q_R)^2         (v lives in the rotated space)
              N = Q_L [(Q_L^T m Q_R) / (sqrt(v) + eps)] Q_R^T
              direction = N * sqrt(1-b2^t) / (1-b1^t)   (N normalised to unit RMS first if asked)
              then L, R absorb G with shampoo_beta, and when t % precondition_frequency == 0 the
              bases refresh: est = diag(Q^T L Q), sort descending, permute v to match, and one
              power-iteration + QR step Q <- qr(L Q_sorted).

The reference keeps `exp_avg` in the rotated basis and, after every step, rotates it back with
the old basis and forward with the new one. Rotation is linear and the basis is orthogonal, so
that is exactly `Q^T m Q` with m kept in the original space; we store m there, which needs no
rotation at refreshes (the parity test runs the reference's rotated form against this one).
Measured on the 8-device CPU mesh, keeping m rotated instead (one projection fewer per step, a
rotation at refreshes) made the SOAP update ~1.5 CPU-s per step slower, not faster.
The per-step math (statistics, projections, Adam in the eigenbasis) is `soap_split.rotated_step`,
split over the mesh with explicit collectives. The decompositions of all parameters run in one
`lax.switch` (keep / first eigh / QR refresh); the refresh branches stack same-sized statistics
and split the stacks across the devices (`soap_bases.update_bases`).

Tensors of any rank get one statistic per dimension (mode-k unfoldings); dimensions larger
than `max_precond_dim` use the identity; 1-D (and 0-D) parameters are plain Adam unless
`precondition_1d`; `merge_dims` first merges adjacent dimensions (as the reference does, for
every parameter of rank >= 2) while their product stays <= `max_precond_dim`.
All linear algebra (statistics, bases, projections, moments) runs in `linalg_dtype`.
`max_precond_block` > 0 (off by default) makes the preconditioner block-diagonal: each block
of the parameter's grid is preconditioned as if it were a parameter of its own (`soap_blocks`;
the per-block steps are batched with vmap, region by region).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from gqlm.optim.soap_bases import permute, update_bases
from gqlm.optim.soap_blocks import (BlockedPreconditioner, block_regions, from_blocks, region_count,
                                    region_shape, to_blocks)
from gqlm.optim.soap_split import block_axes, rotated_step

Dims = tuple[tuple[int, ...], ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Preconditioner:
    """One parameter's Shampoo statistics and eigenbases, one entry per (merged) dimension.

    stats[k], bases[k]: [d_k, d_k] arrays, or None where dimension k uses the identity.
    dims (static): dims[k] = the original parameter dimensions merged into dimension k.
    """
    stats: tuple[jax.Array | None, ...]
    bases: tuple[jax.Array | None, ...]
    dims: Dims = dataclasses.field(metadata=dict(static=True))


class ScaleBySoapState(NamedTuple):
    count: jax.Array  # int32: real (non-initialising) steps taken, the reference's state["step"]
    initialized: jax.Array  # bool: the first call (statistics only) has happened
    mu: Any  # first moment, original space, param shapes
    nu: Any  # second moment, rotated space, param shapes
    precond: Any  # tree of Preconditioner, one per parameter


# ----------------------------------------------------------------------------- layout


def merge_groups(shape: Sequence[int], max_precond_dim: int) -> Dims:
    """The reference's `merge_dims`: adjacent dims merged while their product <= max_precond_dim.

    Returns groups of original dimension indices; size-1 trailing dims join the last group.
    """
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    size = 1
    for i, dim in enumerate(shape):
        if size * dim > max_precond_dim:
            if size > 1:
                groups.append(tuple(current))
                current, size = [i], dim
            else:  # this dim alone is too large: it stands alone (identity preconditioner)
                groups.append(tuple(current + [i]))
                current, size = [], 1
        else:
            current.append(i)
            size *= dim
    if size > 1 or not groups:
        groups.append(tuple(current))
    elif current:
        groups[-1] = groups[-1] + tuple(current)
    return tuple(groups)


def layout(shape: Sequence[int], *, max_precond_dim: int, merge_dims: bool,
           precondition_1d: bool) -> tuple[Dims, tuple[bool, ...]]:
    """(dimension groups, which groups are preconditioned) for a parameter of this shape."""
    if len(shape) == 0:
        return (), ()
    if len(shape) == 1:
        return ((0,),), (precondition_1d and shape[0] <= max_precond_dim,)
    groups = merge_groups(shape, max_precond_dim) if merge_dims else tuple((i,) for i in range(len(shape)))
    sizes = _group_sizes(shape, groups)
    return groups, tuple(s <= max_precond_dim for s in sizes)


def _group_sizes(shape: Sequence[int], groups: Dims) -> tuple[int, ...]:
    sizes = []
    for group in groups:
        size = 1
        for i in group:
            size *= shape[i]
        sizes.append(size)
    return tuple(sizes)


def _to_layout(x: jax.Array, dims: Dims) -> jax.Array:
    return x.reshape(_group_sizes(x.shape, dims)) if dims else x


# ----------------------------------------------------------------------------- transforms


def _zero_precond(shape: Sequence[int], dtype: Any, stack: tuple[int, ...] = (),
                  **shape_opts) -> Preconditioner:
    """Zero statistics and bases for the dimensions `layout` preconditions (None elsewhere);
    stack=(N,): for N blocks of this shape, stacked on a leading axis."""
    dims, active = layout(shape, **shape_opts)
    sizes = _group_sizes(shape, dims)
    zeros = tuple(jnp.zeros((*stack, n, n), dtype) if on else None for n, on in zip(sizes, active))
    return Preconditioner(stats=zeros, bases=zeros, dims=dims)


def _init_precond(p: Any, dtype: Any, max_precond_block: int,
                  **shape_opts) -> Preconditioner | BlockedPreconditioner:
    """A parameter's zero state: whole, or one stacked Preconditioner per region of its blocks."""
    regions = block_regions(p.shape, max_precond_block)
    if not regions:
        return _zero_precond(p.shape, dtype, **shape_opts)
    return BlockedPreconditioner(parts=tuple(
        _zero_precond(region_shape(r), dtype, (region_count(r),), **shape_opts) for r in regions), regions=regions)


def _param_step(g: jax.Array, mu: jax.Array, nu: jax.Array, pc: Preconditioner, t: jax.Array, *,
                b1: float, b2: float, shampoo_beta: float, eps: float, normalize_grads: bool,
                dtype: Any, reserved: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """One parameter's (direction, mu, nu, statistics) from its current bases.

    The statistics absorb g here (zero statistics at the first call give exactly the reference's
    initial lerp from zero); the bases change only in `_refresh`, after every parameter's step.
    `reserved`: mesh axes a caller's vmap deals blocks over (`_blocked_step`).
    """
    g = g.astype(dtype)
    mu = b1 * mu + (1 - b1) * g
    stats = pc.stats
    if any(st is not None for st in stats):
        direction, nu, stats = rotated_step(
            _to_layout(g, pc.dims), _to_layout(mu, pc.dims), _to_layout(nu, pc.dims), stats, pc.bases,
            b2=b2, shampoo_beta=shampoo_beta, eps=eps, reserved=reserved)
        direction, nu = direction.reshape(g.shape), nu.reshape(g.shape)
    else:  # nothing preconditioned: plain Adam
        nu = b2 * nu + (1 - b2) * jnp.square(g)
        direction = mu / (jnp.sqrt(nu) + eps)
    if normalize_grads:
        direction = direction / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
    tf = t.astype(dtype)
    direction = direction * (jnp.sqrt(1 - b2 ** tf) / (1 - b1 ** tf))
    return direction, mu, nu, stats


def _blocked_step(g: jax.Array, mu: jax.Array, nu: jax.Array, pc: BlockedPreconditioner, t: jax.Array,
                  **step_opts) -> tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """`_param_step` of every block, batched region by region (statistics: one tuple per region);
    under a mesh each device steps whole blocks (`block_axes`)."""
    mesh = jax.sharding.get_abstract_mesh()
    outs = []
    for r, part in zip(pc.regions, pc.parts):
        axes = block_axes(region_count(r), mesh)
        step = jax.vmap(functools.partial(_param_step, t=t, reserved=axes, **step_opts), spmd_axis_name=axes or None)
        outs.append(step(to_blocks(g, r), to_blocks(mu, r), to_blocks(nu, r), part))
    direction, mu, nu = (from_blocks([out[i] for out in outs], pc.regions) for i in range(3))
    return direction, mu, nu, tuple(out[3] for out in outs)


def _units(pc: Preconditioner | BlockedPreconditioner) -> tuple[Preconditioner, ...]:
    """The Preconditioners of one parameter: itself, or one (stacked) per region of its blocks."""
    return pc.parts if isinstance(pc, BlockedPreconditioner) else (pc,)


def _permuted(nu: jax.Array, pc: Preconditioner, order: tuple) -> jax.Array:
    """nu (of one parameter or block) following its bases' new eigenvalue order."""
    return permute(_to_layout(nu, pc.dims), order).reshape(nu.shape)


def _refresh(branch: jax.Array, nus: list, stats: list, preconds: list) -> tuple[list, list]:
    """(nu, preconditioner) per parameter once `update_bases` has run `branch` (0 keep / 1 first
    eigh / 2 QR refresh) on the updated statistics: one switch for all parameters and blocks."""
    stats = [st if isinstance(pc, BlockedPreconditioner) else (st,) for st, pc in zip(stats, preconds)]
    bases, orders = update_bases(branch, [s for st in stats for s in st],
                                 [u.bases for pc in preconds for u in _units(pc)])
    bases, orders = iter(bases), iter(orders)
    new_nus, new_pcs = [], []
    for nu, pc, st in zip(nus, preconds, stats):
        parts = [dataclasses.replace(u, stats=s, bases=next(bases)) for u, s in zip(_units(pc), st)]
        part_orders = [next(orders) for _ in parts]
        # v follows the eigenvalue order (the orders are the identity unless refreshing).
        if isinstance(pc, BlockedPreconditioner):
            new_nus.append(from_blocks([jax.vmap(_permuted)(to_blocks(nu, r), part, order) for r, part, order
                                        in zip(pc.regions, parts, part_orders)], pc.regions))
            new_pcs.append(dataclasses.replace(pc, parts=tuple(parts)))
        else:
            new_nus.append(_permuted(nu, parts[0], part_orders[0]))
            new_pcs.append(parts[0])
    return new_nus, new_pcs


def _update(updates: Any, state: ScaleBySoapState, precondition_frequency: int,
            **step_opts) -> tuple[Any, ScaleBySoapState]:
    """scale_by_soap's update: each parameter's `_param_step`, then the bases' `_refresh`."""
    treedef = jax.tree.structure(updates)
    gs, mus, nus, pcs = (treedef.flatten_up_to(x) for x in (updates, state.mu, state.nu, state.precond))
    t = state.count + 1
    outs = [(_blocked_step if isinstance(pc, BlockedPreconditioner) else _param_step)(g, mu, nu, pc, t, **step_opts)
            for g, mu, nu, pc in zip(gs, mus, nus, pcs)]
    # The first call only builds statistics and bases: no update, moments untouched.
    first = ~state.initialized
    directions = [jnp.where(first, 0, d).astype(g.dtype) for (d, *_), g in zip(outs, gs)]
    new_mus = [jnp.where(first, mu, m) for (_, m, _, _), mu in zip(outs, mus)]
    new_nus = [jnp.where(first, nu, n) for (*_, n, _), nu in zip(outs, nus)]
    branch = jnp.where(first, 1, jnp.where(t % precondition_frequency == 0, 2, 0))
    new_nus, precond = _refresh(branch, new_nus, [o[3] for o in outs], pcs)
    new_state = ScaleBySoapState(
        count=jnp.where(first, state.count, t), initialized=jnp.ones([], bool),
        mu=treedef.unflatten(new_mus), nu=treedef.unflatten(new_nus), precond=treedef.unflatten(precond))
    return treedef.unflatten(directions), new_state


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, shampoo_beta: float = -1, eps: float = 1e-8,
                  precondition_frequency: int = 10, max_precond_dim: int = 10000,
                  merge_dims: bool = False, precondition_1d: bool = False,
                  normalize_grads: bool = False, linalg_dtype: Any = jnp.float32,
                  max_precond_block: int = 0) -> optax.GradientTransformation:
    """SOAP's bias-corrected preconditioned direction (scale by -lr afterwards).

    shampoo_beta < 0 means b2. The first call returns zeros and only builds the statistics.
    max_precond_block > 0: dimensions longer than it are cut into blocks, each block an
    independent SOAP sub-matrix (`soap_blocks`); 0 (default) is the reference algorithm.
    """
    dtype = jnp.dtype(linalg_dtype)
    shape_opts = dict(max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                      precondition_1d=precondition_1d)
    step_opts = dict(b1=b1, b2=b2, shampoo_beta=b2 if shampoo_beta < 0 else shampoo_beta, eps=eps,
                     normalize_grads=normalize_grads, dtype=dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return ScaleBySoapState(count=jnp.zeros([], jnp.int32), initialized=jnp.zeros([], bool),
                                mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params),
                                precond=jax.tree.map(lambda p: _init_precond(p, dtype, max_precond_block, **shape_opts),
                                                     params))

    def update(updates, state, params=None):
        del params
        return _update(updates, state, precondition_frequency, **step_opts)

    return optax.GradientTransformation(init, update)


class SoapState(NamedTuple):
    count: jax.Array  # int32: calls so far, indexes the learning-rate schedule
    soap: ScaleBySoapState


def soap(learning_rate: optax.ScalarOrSchedule, b1: float = 0.95, b2: float = 0.95,
         shampoo_beta: float = -1, eps: float = 1e-8, weight_decay: float = 0.01,
         precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
         precondition_1d: bool = False, normalize_grads: bool = False,
         linalg_dtype: Any = jnp.float32, mask: Any = None,
         max_precond_block: int = 0) -> optax.GradientTransformation:
    """SOAP with the reference's decoupled weight decay.

    The reference does p <- p - lr_t * c_t * N, then p <- p * (1 - lr * wd) on the UPDATED p
    (lr is the scheduled rate, c_t the bias correction), and neither on the first call. As an
    optax update: a = -lr * c_t * N;  update = a - lr * wd * (p + a).
    `mask` (tree of bools or callable on params) limits the decay, as in optax.
    """
    inner = scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
                          merge_dims, precondition_1d, normalize_grads, linalg_dtype, max_precond_block)

    def init(params):
        return SoapState(count=jnp.zeros([], jnp.int32), soap=inner.init(params))

    def update(updates, state, params=None):
        if weight_decay > 0 and params is None:
            raise ValueError("soap with weight_decay > 0 needs params in update()")
        directions, inner_state = inner.update(updates, state.soap)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr)
        steps = jax.tree.map(lambda d: -lr.astype(d.dtype) * d, directions)
        if weight_decay > 0:
            decays = jax.tree.map(lambda _: True, params) if mask is None else (
                mask(params) if callable(mask) else mask)

            def decay(a, p, on):
                # No decay on the initialising call, exactly like the reference.
                rate = lr.astype(a.dtype) * weight_decay * state.soap.initialized.astype(a.dtype)
                return (a - rate * (p + a)).astype(a.dtype) if on else a
            steps = jax.tree.map(decay, steps, params, decays)
        return steps, SoapState(count=optax.safe_int32_increment(state.count), soap=inner_state)

    return optax.GradientTransformation(init, update)
