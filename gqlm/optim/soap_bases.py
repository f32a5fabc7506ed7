"""SOAP's eigenbases: the first eigh, the QR refreshes, and their split over the mesh.

A statistic may be one [d, d] matrix or a stack [N, d, d] (the blocks of a parameter under
`max_precond_block`, see `soap_blocks`); either way every matrix is decomposed on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqlm.optim.soap_split import basis_spec, stacked_spec

# ----------------------------------------------------------------------------- decompositions


def permute(x: jax.Array, orders: tuple) -> jax.Array:
    """x (layout-shaped) reordered along each dimension k by orders[k] (None: unchanged)."""
    for k, order in enumerate(orders):
        if order is not None:
            x = jnp.take(x, order, axis=k)
    return x


def _eigenbasis(s: jax.Array) -> jax.Array:
    return jnp.linalg.eigh(s)[1][:, ::-1]


def _qr_refresh(s: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(new basis, order) of one statistic s and its basis q [d, d]."""
    estimated = jnp.sum(q * (s @ q), axis=0)  # diag(Q^T L Q)
    order = jnp.argsort(estimated, descending=True)
    return jnp.linalg.qr(s @ q[:, order])[0], order


# ----------------------------------------------------------------------------- distributed refresh
# eigh and QR cannot be partitioned inside one matrix, so under a mesh every device would repeat
# every decomposition. Instead the same-sized statistics of all parameters are stacked and the
# stack is split over all devices (padded with identities to a multiple of the device count): each
# device decomposes its share, as distributed Shampoo does, looping over it with unbatched LAPACK
# calls (batched eigh/QR block XLA:CPU's shared thread pool and deadlocked 8 fake devices). The
# stacking (an all-to-all of every statistic and basis) happens inside the refresh branches only,
# so the 9 steps in 10 that keep their bases move nothing.


def _spread(x_N: jax.Array) -> jax.Array:
    """x_N [N, d, d] padded to a multiple of the device count and split over every mesh axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x_N
    pad = -x_N.shape[0] % mesh.size
    if pad:
        eye = jnp.broadcast_to(jnp.eye(x_N.shape[-1], dtype=x_N.dtype), (pad, *x_N.shape[1:]))
        x_N = jnp.concatenate([x_N, eye])
    spec = jax.sharding.PartitionSpec(mesh.axis_names, None, None)
    return jax.lax.with_sharding_constraint(x_N, jax.sharding.NamedSharding(mesh, spec))


def _as_basis(q: jax.Array) -> jax.Array:
    """q [d, d] or [N, d, d] laid out like the stored bases (columns split), whichever branch
    produced it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return q
    spec = stacked_spec(basis_spec, q.shape, mesh)
    return jax.lax.with_sharding_constraint(q, jax.sharding.NamedSharding(mesh, spec))


def _per_matrix(fn, *stacks_N: jax.Array):
    """fn(*matrices) for each index of the stacks [N, d, d], each device doing its own share."""
    def local(*xs):
        outs = [fn(*(x[i] for x in xs)) for i in range(xs[0].shape[0])]
        return jax.tree.map(lambda *o: jnp.stack(o), *outs)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(*stacks_N)
    spec = jax.sharding.PartitionSpec(mesh.axis_names)
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)(*stacks_N)


def _stack(xs: list[jax.Array]) -> jax.Array:
    """[d, d] matrices and [N, d, d] stacks as one stack."""
    return jnp.concatenate([x.reshape(-1, *x.shape[-2:]) for x in xs])


def _take(x_N: jax.Array, start: int, like: jax.Array) -> jax.Array:
    """What `_stack` put at `start` for `like`: one matrix ([d, d]) or a stack ([N, d, d])."""
    return x_N[start] if like.ndim == 2 else x_N[start:start + like.shape[0]]


def update_bases(branch: jax.Array, stats: list[tuple], bases: list[tuple]
                 ) -> tuple[list[tuple], list[tuple]]:
    """Every parameter's (new bases, new orders) for branch 0 keep / 1 first eigh / 2 QR refresh.

    stats, bases: one tuple per parameter, a [d, d] (or stacked [N, d, d]) array or None per
    dimension. Orders ([d] or [N, d]) are the permutations applied to the eigenvalue order (the
    identity unless refreshing).
    """
    slots = [(p, k) for p, dims in enumerate(stats) for k, st in enumerate(dims) if st is not None]
    sizes = sorted({stats[p][k].shape[-1] for p, k in slots})
    groups = [[(p, k) for p, k in slots if stats[p][k].shape[-1] == d] for d in sizes]

    def identity_orders():
        return [tuple(None if q is None else jnp.broadcast_to(jnp.arange(q.shape[-1]), q.shape[:-1])
                      for q in dims) for dims in bases]

    def keep(stats, bases):
        return [tuple(dims) for dims in bases], identity_orders()

    def decompose(per_group):
        """A branch: stack each size group, split it over the devices, run `per_group` on each
        (stats [N, d, d], bases [N, d, d]) -> (bases, orders), and put the results back."""
        def branch_fn(stats, bases):
            new_bases = [list(dims) for dims in bases]
            orders = [list(o) for o in identity_orders()]
            for g in groups:
                s_N = _spread(_stack([stats[p][k] for p, k in g]))
                q_N = _spread(_stack([bases[p][k] for p, k in g]))
                q_N, order_N = per_group(s_N, q_N)
                start = 0
                for p, k in g:
                    like = bases[p][k]
                    new_bases[p][k], orders[p][k] = _as_basis(_take(q_N, start, like)), _take(order_N, start, like)
                    start += 1 if like.ndim == 2 else like.shape[0]
            return [tuple(b) for b in new_bases], [tuple(o) for o in orders]
        return branch_fn

    def first(s_N, q_N):
        return _per_matrix(_eigenbasis, s_N), jnp.broadcast_to(jnp.arange(q_N.shape[-1]), q_N.shape[:2])

    def refresh(s_N, q_N):
        return _per_matrix(_qr_refresh, s_N, q_N)

    return jax.lax.switch(branch, [keep, decompose(first), decompose(refresh)], stats, bases)

