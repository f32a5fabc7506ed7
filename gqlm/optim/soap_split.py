"""SOAP's per-step math (statistics, projections, Adam in the eigenbasis), split over the mesh.

Left to GSPMD, a step of an fsdp-sharded [m, n] matrix all-reduces full [n, n] Gram partial sums
and all-gathers full [n, n] bases for every projection: ~5x the bytes of the parameter, and on
the 8-device CPU mesh these collectives took 3x as long as the arithmetic. Here one
`jax.shard_map` over every mesh axis does it with explicit collectives:

  - the gradient and first moment arrive whole (one all-gather of the parameter's size, the same
    gather FSDP does for the forward pass);
  - each device owns a block of rows of every statistic and a block of columns of every basis
    (`statistic_spec`, `basis_spec`: split over all mesh axes that divide the dimension, so a
    data-parallel mesh shares the optimizer state too) and updates its Gram rows locally;
  - the projection keeps the largest preconditioned dimension `s` split: X x_s Q_s[:, cols]^T is
    local, the other (smaller) bases are all-gathered, and the rotated moments stay split along s;
  - back-projection contracts the split dimension against the local columns of Q_s and
    reduce-scatters once.

Without a mesh (or on one device) the same code runs with every dimension whole.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def split_axes(d: int, mesh, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The mesh axes (size > 1, in mesh order, not in `exclude`) over which a [d, d] statistic's
    rows (and a basis's columns) are split: of the sets whose product divides d, one with the
    largest product."""
    if mesh is None or mesh.empty:
        return ()
    names = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in exclude]
    best, best_size = (), 1
    for subset in itertools.chain.from_iterable(itertools.combinations(names, r) for r in range(1, len(names) + 1)):
        size = _size(subset, mesh)
        if d % size == 0 and size > best_size:
            best, best_size = subset, size
    return best


def _entry(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else (axes or None)


def block_axes(blocks: int, mesh) -> tuple[str, ...]:
    """The mesh axes over which the blocks of a region (`max_precond_block`, see `soap_blocks`)
    are dealt out, whole blocks to each device, as distributed Shampoo does: those dividing
    their count. Their per-step math is vmapped over these axes (`spmd_axis_name`); the
    statistics' rows and the bases' columns split over the other axes, as for a parameter."""
    return split_axes(blocks, mesh)


def statistic_spec(d: int, mesh, blocks: int = 0) -> P:
    """A [d, d] Shampoo statistic: rows split over every mesh axis that divides d. `blocks` > 0:
    a stack [blocks, d, d], the block axis split first (`block_axes`), rows over the rest."""
    if not blocks:
        return P(_entry(split_axes(d, mesh)), None)
    outer = block_axes(blocks, mesh)
    return P(_entry(outer), _entry(split_axes(d, mesh, outer)), None)


def basis_spec(d: int, mesh, blocks: int = 0) -> P:
    """A [d, d] eigenbasis (or a stack of `blocks`): columns split like the statistic's rows."""
    spec = statistic_spec(d, mesh, blocks)
    return P(*spec[:-2], spec[-1], spec[-2])


def stacked_spec(spec_of, shape: Sequence[int], mesh) -> P:
    """`spec_of` (statistic_spec or basis_spec) for a [d, d] array or a stack of blocks' [N, d, d]."""
    return spec_of(shape[-1], mesh, shape[0] if len(shape) == 3 else 0)


def split_dim(sizes: Sequence[int], active: Sequence[bool], mesh, exclude: tuple[str, ...] = ()) -> int:
    """The preconditioned dimension kept split (most devices, then largest); -1 if none."""
    candidates = [k for k, on in enumerate(active) if on]
    if not candidates:
        return -1
    return max(candidates, key=lambda k: (_size(split_axes(sizes[k], mesh, exclude), mesh), sizes[k]))


def _along(ndim: int, k: int, axes: tuple[str, ...]) -> P:
    """A spec splitting dimension k of an ndim-array over `axes`."""
    return P(*(_entry(axes) if i == k else None for i in range(ndim)))


def rotated_spec(shape: Sequence[int], dims: tuple, active: Sequence[bool], mesh) -> P | None:
    """Sharding of a parameter-shaped moment kept in the eigenbasis (SOAP's nu), split along the
    dimension `rotated_step` keeps split; None where dims are merged (the parameter's own spec
    then; the step reshards) or nothing is preconditioned."""
    if not any(active) or any(len(group) > 1 for group in dims):
        return None
    s = split_dim(shape, active, mesh)
    return _along(len(shape), s, split_axes(shape[s], mesh))


def _size(axes: tuple[str, ...], mesh) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _mode(x: jax.Array, q: jax.Array, k: int, q_dim: int) -> jax.Array:
    """Contract mode k of x with dimension q_dim of q; the result's mode k is q's other one."""
    return jnp.moveaxis(jnp.tensordot(x, q, axes=([k], [q_dim])), -1, k)


# The shard_map below runs with check_vma=False: where another dimension's basis is gathered over
# an axis that does not split s (e.g. [6, 20, 4] on data 2 x fsdp 4: dim 0 over data, dim 1 over
# fsdp), `all_gather` types its result as varying over that axis although every device holds the
# same basis; u and nu are then replicated over it in fact, as out_specs state, but the type check
# cannot infer it (tests/test_soap.py checks such a mesh against one device).
def rotated_step(g_l: jax.Array, mu_l: jax.Array, nu_l: jax.Array, stats: tuple, bases: tuple, *,
                 b2: float, shampoo_beta: float, eps: float,
                 reserved: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array, tuple]:
    """(Q [Q^T mu Q / (sqrt(nu') + eps)] Q^T, nu', statistics absorbing g) for one parameter.

    g_l, mu_l, nu_l are layout-shaped (merged dims); stats/bases hold a [d, d] array or None
    (identity) per dimension; at least one dimension is preconditioned. nu' = b2 nu + (1-b2)
    (Q^T g Q)^2. Statistics: L_k <- sb L_k + (1 - sb) G_(k) G_(k)^T. `reserved`: mesh axes a
    caller's vmap deals blocks over (`block_axes`); nothing is split over them here.
    """
    mesh = jax.sharding.get_abstract_mesh()
    mesh = None if mesh.empty or mesh.size == 1 else mesh
    sizes = g_l.shape
    active = tuple(s is not None for s in stats)
    s = split_dim(sizes, active, mesh, reserved)
    ks = [k for k, on in enumerate(active) if on]
    axes = {k: split_axes(sizes[k], mesh, reserved) for k in ks}

    def local(x_2, nu, st, qs):
        """Per device: x_2 = [g, mu] whole; nu split along s; st rows / qs columns local."""
        st, qs = dict(zip(ks, st)), dict(zip(ks, qs))
        g = x_2[0]
        new_st = []
        for k in ks:
            rows = sizes[k] // _size(axes[k], mesh)
            start = jax.lax.axis_index(axes[k]) * rows if axes[k] else 0
            g_rows = jax.lax.dynamic_slice_in_dim(g, start, rows, axis=k)
            others = [i for i in range(g.ndim) if i != k]
            gram = jnp.tensordot(g_rows, g, axes=(others, others))
            new_st.append(shampoo_beta * st[k] + (1 - shampoo_beta) * gram)
        whole = {k: jax.lax.all_gather(qs[k], axes[k], axis=1, tiled=True) if axes[k] else qs[k]
                 for k in ks if k != s}
        y_2 = _mode(x_2, qs[s], s + 1, 0)  # local columns of Q_s: the result is split along s
        for k in whole:
            y_2 = _mode(y_2, whole[k], k + 1, 0)
        nu = b2 * nu + (1 - b2) * jnp.square(y_2[0])
        u = y_2[1] / (jnp.sqrt(nu) + eps)
        for k in whole:
            u = _mode(u, whole[k], k, 1)
        u = _mode(u, qs[s], s, 1)  # partial sums over this device's columns of Q_s
        if axes[s]:
            u = jax.lax.psum_scatter(u, axes[s], scatter_dimension=s, tiled=True)
        return u, nu, tuple(new_st)

    x_2 = jnp.stack([g_l, mu_l])
    st_in, q_in = tuple(stats[k] for k in ks), tuple(bases[k] for k in ks)
    if mesh is None:
        u, nu, new_st = local(x_2, nu_l, st_in, q_in)
    else:
        along_s = _along(len(sizes), s, axes[s])
        st_specs = tuple(P(_entry(axes[k]), None) for k in ks)
        q_specs = tuple(P(None, _entry(axes[k])) for k in ks)
        # check_vma=False: see the note above this function.
        u, nu, new_st = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), along_s, st_specs, q_specs),
            out_specs=(along_s, along_s, st_specs), check_vma=False)(x_2, nu_l, st_in, q_in)
    new_stats = list(stats)
    for k, st in zip(ks, new_st):
        new_stats[k] = st
    return u, nu, tuple(new_stats)
