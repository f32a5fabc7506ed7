"""SOAP (Vyas et al., 2024): Adam run in the eigenbasis of Shampoo's preconditioner.

Follows the paper's official PyTorch implementation step by step. For a 2-D gradient G with
Shampoo statistics L, R and eigenbases Q_L, Q_R (one pair per parameter):

  call 0      L, R = (1-sb) G G^T, (1-sb) G^T G;  Q = eigh(.) sorted by descending eigenvalue;
              update = 0, step counter t stays 0 (the current gradient is never used to project
              itself).
  call t>=1   G' = Q_L^T G Q_R;  m = b1 m + (1-b1) G';  v = b2 v + (1-b2) G'^2   (rotated space)
              N = Q_L [m / (sqrt(v) + eps)] Q_R^T
              direction = N * sqrt(1-b2^t) / (1-b1^t)   (N normalised to unit RMS first if asked)
              then L, R absorb G with shampoo_beta, and when t % precondition_frequency == 0 the
              bases refresh: est = diag(Q^T L Q), sort descending, permute v to match, one
              power-iteration + QR step Q <- qr(L Q_sorted), and m is re-expressed in the new basis.

The reference rotates `exp_avg` back with the old basis and forward with the new one after
every step; between refreshes the basis does not change, so that is the identity and we rotate
only at refreshes (three matrix products per dimension and step instead of five). All the
linear algebra of one call sits in a single `lax.switch` (keep / first eigh / QR refresh).

Tensors of any rank get one statistic per dimension (mode-k unfoldings); dimensions larger
than `max_precond_dim` use the identity; 1-D (and 0-D) parameters are plain Adam unless
`precondition_1d`; `merge_dims` first merges adjacent dimensions (as the reference does, for
every parameter of rank >= 2) while their product stays <= `max_precond_dim`.
All linear algebra (statistics, bases, projections, moments) runs in `linalg_dtype`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

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
    mu: Any  # first moment, rotated space, param shapes
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


# ----------------------------------------------------------------------------- pure steps


def _mode_gram(x: jax.Array, k: int) -> jax.Array:
    """Contraction of x with itself over every dimension except k: [d_k, d_k]."""
    others = [i for i in range(x.ndim) if i != k]
    return jnp.tensordot(x, x, axes=(others, others))


def init_statistics(g: jax.Array, active: Sequence[bool], shampoo_beta: float) -> tuple:
    """First statistics from the first (layout-shaped) gradient: a lerp from zero."""
    return tuple((1 - shampoo_beta) * _mode_gram(g, k) if on else None for k, on in enumerate(active))


def update_statistics(stats: tuple, g: jax.Array, shampoo_beta: float) -> tuple:
    """L_k <- sb L_k + (1 - sb) G_(k) G_(k)^T for each preconditioned dimension k."""
    return tuple(None if s is None else shampoo_beta * s + (1 - shampoo_beta) * _mode_gram(g, k)
                 for k, s in enumerate(stats))


def initial_bases(stats: tuple) -> tuple:
    """Eigenvectors of each statistic, columns sorted by descending eigenvalue."""
    return tuple(None if s is None else jnp.linalg.eigh(s)[1][:, ::-1] for s in stats)


def project(x: jax.Array, bases: tuple) -> jax.Array:
    """x x_k Q_k^T for every mode k (for a matrix: Q_L^T X Q_R)."""
    for k, q in enumerate(bases):
        if q is not None:
            x = jnp.moveaxis(jnp.tensordot(x, q, axes=([k], [0])), -1, k)
    return x


def project_back(x: jax.Array, bases: tuple) -> jax.Array:
    """x x_k Q_k for every mode k (for a matrix: Q_L X Q_R^T); inverse of `project`."""
    for k, q in enumerate(bases):
        if q is not None:
            x = jnp.moveaxis(jnp.tensordot(x, q, axes=([k], [1])), -1, k)
    return x


def refresh_bases(stats: tuple, bases: tuple, nu: jax.Array) -> tuple[tuple, jax.Array]:
    """One power-iteration + QR step per basis; nu (layout-shaped) permuted to the new order."""
    new_bases = []
    for k, (s, q) in enumerate(zip(stats, bases)):
        if s is None:
            new_bases.append(None)
            continue
        estimated = jnp.sum(q * (s @ q), axis=0)  # diag(Q^T L Q)
        order = jnp.argsort(estimated, descending=True)
        nu = jnp.take(nu, order, axis=k)
        new_bases.append(jnp.linalg.qr(s @ q[:, order])[0])
    return tuple(new_bases), nu


# ----------------------------------------------------------------------------- transforms


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, shampoo_beta: float = -1, eps: float = 1e-8,
                  precondition_frequency: int = 10, max_precond_dim: int = 10000,
                  merge_dims: bool = False, precondition_1d: bool = False,
                  normalize_grads: bool = False,
                  linalg_dtype: Any = jnp.float32) -> optax.GradientTransformation:
    """SOAP's bias-corrected preconditioned direction (scale by -lr afterwards).

    shampoo_beta < 0 means b2. The first call returns zeros and only builds the statistics.
    """
    sb = b2 if shampoo_beta < 0 else shampoo_beta
    dtype = jnp.dtype(linalg_dtype)
    shape_opts = dict(max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                      precondition_1d=precondition_1d)

    def init_precond(p):
        dims, active = layout(p.shape, **shape_opts)
        sizes = _group_sizes(p.shape, dims)
        zeros = tuple(jnp.zeros((n, n), dtype) if on else None for n, on in zip(sizes, active))
        return Preconditioner(stats=zeros, bases=zeros, dims=dims)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return ScaleBySoapState(count=jnp.zeros([], jnp.int32), initialized=jnp.zeros([], bool),
                                mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params),
                                precond=jax.tree.map(init_precond, params))

    def step(g, mu, nu, pc, t):
        """Direction and moments from the current bases; statistics absorb g (zero stats at
        the first call give exactly the reference's initial lerp from zero)."""
        g_l = _to_layout(g.astype(dtype), pc.dims)
        g_rot = project(g_l, pc.bases)
        mu_l = b1 * _to_layout(mu, pc.dims) + (1 - b1) * g_rot
        nu_l = b2 * _to_layout(nu, pc.dims) + (1 - b2) * jnp.square(g_rot)
        direction = project_back(mu_l / (jnp.sqrt(nu_l) + eps), pc.bases).reshape(g.shape)
        if normalize_grads:
            direction = direction / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
        tf = t.astype(dtype)
        direction = direction * (jnp.sqrt(1 - b2 ** tf) / (1 - b1 ** tf))
        return direction, mu_l, nu_l, update_statistics(pc.stats, g_l, sb)

    def keep(stats, bases, mu_l, nu_l):
        return bases, mu_l, nu_l

    def first_bases(stats, bases, mu_l, nu_l):
        return initial_bases(stats), mu_l, nu_l

    def refresh(stats, bases, mu_l, nu_l):
        new_bases, nu_l = refresh_bases(stats, bases, nu_l)
        return new_bases, project(project_back(mu_l, bases), new_bases), nu_l

    def update(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        flat = [treedef.flatten_up_to(x) for x in (updates, state.mu, state.nu, state.precond)]
        t = state.count + 1
        outs = [step(g, mu, nu, pc, t) for g, mu, nu, pc in zip(*flat)]
        # The first call only builds statistics and bases: no update, moments untouched.
        first = ~state.initialized
        directions = [jnp.where(first, 0, d).astype(g.dtype) for (d, *_), g in zip(outs, flat[0])]
        mus = [jnp.where(first, _to_layout(mu, pc.dims), m) for (_, m, _, _), mu, pc in zip(outs, flat[1], flat[3])]
        nus = [jnp.where(first, _to_layout(nu, pc.dims), n) for (*_, n, _), nu, pc in zip(outs, flat[2], flat[3])]
        stats = [o[3] for o in outs]

        # One conditional for every parameter's linear algebra (eigh on the first call, a QR
        # refresh every precondition_frequency steps, nothing otherwise). The reference rotates
        # exp_avg back and forth every step; between refreshes that is the identity, so the
        # first moment is rotated only when the basis changes.
        def branch(fn):
            def run(operands):
                return [fn(*x) for x in zip(*operands)]
            return run
        index = jnp.where(first, 1, jnp.where(t % precondition_frequency == 0, 2, 0))
        results = jax.lax.switch(index, [branch(keep), branch(first_bases), branch(refresh)],
                                 (stats, [pc.bases for pc in flat[3]], mus, nus))
        precond = [dataclasses.replace(pc, stats=st, bases=b) for pc, st, (b, _, _) in zip(flat[3], stats, results)]
        new_state = ScaleBySoapState(
            count=jnp.where(first, state.count, t), initialized=jnp.ones([], bool),
            mu=treedef.unflatten([m.reshape(g.shape) for (_, m, _), g in zip(results, flat[0])]),
            nu=treedef.unflatten([n.reshape(g.shape) for (_, _, n), g in zip(results, flat[0])]),
            precond=treedef.unflatten(precond))
        return treedef.unflatten(directions), new_state

    return optax.GradientTransformation(init, update)


class SoapState(NamedTuple):
    count: jax.Array  # int32: calls so far, indexes the learning-rate schedule
    soap: ScaleBySoapState


def soap(learning_rate: optax.ScalarOrSchedule, b1: float = 0.95, b2: float = 0.95,
         shampoo_beta: float = -1, eps: float = 1e-8, weight_decay: float = 0.01,
         precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
         precondition_1d: bool = False, normalize_grads: bool = False,
         linalg_dtype: Any = jnp.float32, mask: Any = None) -> optax.GradientTransformation:
    """SOAP with the reference's decoupled weight decay.

    The reference does p <- p - lr_t * c_t * N, then p <- p * (1 - lr * wd) on the UPDATED p
    (lr is the scheduled rate, c_t the bias correction), and neither on the first call. As an
    optax update: a = -lr * c_t * N;  update = a - lr * wd * (p + a).
    `mask` (tree of bools or callable on params) limits the decay, as in optax.
    """
    inner = scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
                          merge_dims, precondition_1d, normalize_grads, linalg_dtype)

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
