"""SOAP's pure pieces against NumPy, its first two calls in closed form, sharding, and a
steps-to-target comparison with Adam on an ill-conditioned quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gqlm.config import MESH_AXES
from gqlm.optim import soap as S
from gqlm.optim.soap_split import rotated_step, split_axes, split_dim


def _unfold(x, k):
    return np.moveaxis(x, k, 0).reshape(x.shape[k], -1)


@pytest.mark.parametrize("shape,max_dim,groups", [
    ((4, 3, 5), 32, ((0, 1), (2,))),
    ((64, 3), 32, ((0,), (1,))),
    ((2, 3, 4), 10000, ((0, 1, 2),)),
    ((1, 40, 1), 32, ((0, 1, 2),)),  # size-1 dims ride along; 40 > 32 stands alone
    ((5, 40, 3, 2), 32, ((0,), (1,), (2, 3))),
])
def test_merge_groups(shape, max_dim, groups):
    assert S.merge_groups(shape, max_dim) == groups


def test_layout():
    opts = dict(max_precond_dim=32, merge_dims=False)
    assert S.layout((8,), precondition_1d=False, **opts) == (((0,),), (False,))
    assert S.layout((8,), precondition_1d=True, **opts) == (((0,),), (True,))
    assert S.layout((40,), precondition_1d=True, **opts) == (((0,),), (False,))
    assert S.layout((64, 3), precondition_1d=False, **opts) == (((0,), (1,)), (False, True))
    assert S.layout((), precondition_1d=True, **opts) == ((), ())


def _orthogonal(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def _mode_product(x, q, k, q_dim):
    """NumPy mode-k product: contract mode k of x with dimension q_dim of q."""
    return np.moveaxis(np.tensordot(x, q, axes=([k], [q_dim])), -1, k)


@pytest.mark.parametrize("shape,active", [((5, 7), (True, True)), ((4, 3, 5), (True, False, True)),
                                          ((6, 4), (False, True))])
def test_rotated_step_matches_numpy(shape, active):
    """Statistics, second moment and direction of one step against a NumPy transcription of the
    reference (Q_L^T G Q_R, Adam there, rotated back), with an identity dimension where inactive."""
    rng = np.random.default_rng(0)
    g, mu = rng.normal(size=shape), rng.normal(size=shape)
    nu = rng.uniform(0.5, 1.5, size=shape)
    stats = [rng.normal(size=(n, n)) if on else None for n, on in zip(shape, active)]
    stats = [None if st is None else st @ st.T for st in stats]
    bases = [_orthogonal(rng, n) if on else None for n, on in zip(shape, active)]
    b2, sb, eps = 0.95, 0.9, 1e-8
    direction, nu_new, stats_new = rotated_step(
        *(jnp.asarray(x, jnp.float32) for x in (g, mu, nu)),
        tuple(None if st is None else jnp.asarray(st, jnp.float32) for st in stats),
        tuple(None if q is None else jnp.asarray(q, jnp.float32) for q in bases), b2=b2, shampoo_beta=sb, eps=eps)

    def rotate(x, q_dim):
        for k, q in enumerate(bases):
            if q is not None:
                x = _mode_product(x, q, k, q_dim)
        return x
    want_nu = b2 * nu + (1 - b2) * rotate(g, 0) ** 2
    want = rotate(rotate(mu, 0) / (np.sqrt(want_nu) + eps), 1)
    np.testing.assert_allclose(nu_new, want_nu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(direction, want, rtol=1e-4, atol=1e-4)
    for k, (st, new) in enumerate(zip(stats, stats_new)):
        if st is None:
            assert new is None
            continue
        unfold = _unfold(g, k)
        np.testing.assert_allclose(new, sb * st + (1 - sb) * unfold @ unfold.T, rtol=1e-4, atol=1e-4)


def test_split_axes_take_the_largest_dividing_set():
    mesh = jax.make_mesh((2, 4, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    assert split_axes(64, mesh) == ("data", "fsdp")
    assert split_axes(20, mesh) == ("fsdp",)  # 8 does not divide 20; 4 does, and beats data's 2
    assert split_axes(6, mesh) == ("data",)
    assert split_axes(7, mesh) == ()
    assert split_axes(64, None) == ()
    # The dimension kept split: the one over the most devices, then the larger.
    assert split_dim((12, 64), (True, True), mesh) == 1
    assert split_dim((64, 12), (True, True), mesh) == 0
    assert split_dim((20, 12), (True, True), mesh) == 0
    assert split_dim((20, 64), (True, False), mesh) == 0
    assert split_dim((5, 7), (True, True), None) == 1
    assert split_dim((5, 7), (False, False), mesh) == -1


def test_update_bases_first_eigh_and_qr_refresh():
    """Branch 1: eigenvectors by descending eigenvalue; branch 2: the reference's refresh (order by
    diag(Q^T L Q), one QR step of L Q_sorted); branch 0 keeps the bases."""
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(6, 20)), rng.normal(size=(6, 9)), rng.normal(size=(4, 9))]
    stats = [(jnp.asarray(x @ x.T, jnp.float32),) for x in xs]
    old = [(jnp.asarray(_orthogonal(rng, x.shape[0]), jnp.float32),) for x in xs]

    first, orders = S.update_bases(jnp.asarray(1), stats, old)
    for (q,), (order,), x in zip(first, orders, xs):
        q = np.asarray(q)
        np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)
        d = q.T @ (x @ x.T) @ q
        np.testing.assert_allclose(np.diag(d), np.sort(np.linalg.eigvalsh(x @ x.T))[::-1], rtol=1e-4)
        np.testing.assert_allclose(d, np.diag(np.diag(d)), atol=1e-3)
        np.testing.assert_array_equal(order, np.arange(len(q)))

    refreshed, orders = S.update_bases(jnp.asarray(2), stats, old)
    for (q,), (order,), (q_old,), x in zip(refreshed, orders, old, xs):
        stat, q_old = x @ x.T, np.asarray(q_old, np.float64)
        want_order = np.argsort(-np.diag(q_old.T @ stat @ q_old))
        np.testing.assert_array_equal(order, want_order)
        q_want = np.linalg.qr(stat @ q_old[:, want_order])[0]
        np.testing.assert_allclose(np.abs(np.asarray(q).T @ q_want), np.eye(len(q_want)), atol=1e-4)  # signs

    kept, _ = S.update_bases(jnp.asarray(0), stats, old)
    for (q,), (q_old,) in zip(kept, old):
        np.testing.assert_array_equal(q, q_old)


def test_permute_follows_orders():
    x = np.arange(24.0).reshape(2, 3, 4)
    orders = (None, jnp.asarray([2, 0, 1]), jnp.asarray([3, 2, 1, 0]))
    np.testing.assert_array_equal(S.permute(jnp.asarray(x), orders), x[:, [2, 0, 1]][:, :, ::-1])


def test_first_two_calls_closed_form():
    rng = np.random.default_rng(4)
    g1, g2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    b1, b2, eps = 0.9, 0.99, 1e-8
    tx = S.scale_by_soap(b1=b1, b2=b2, eps=eps)
    state = tx.init(jnp.zeros((5, 4)))
    d1, state = tx.update(jnp.asarray(g1), state)
    np.testing.assert_array_equal(d1, np.zeros((5, 4)))
    assert int(state.count) == 0 and bool(state.initialized)
    d2, state = tx.update(jnp.asarray(g2), state)
    assert int(state.count) == 1
    # Closed form for t=1 with the bases of the first gradient: the 4x4 side is full rank and the
    # 5x5 side's null space is one-dimensional, so both bases are unique up to column signs,
    # which SOAP's direction does not depend on.
    ql = np.linalg.eigh(g1 @ g1.T)[1][:, ::-1]
    qr = np.linalg.eigh(g1.T @ g1)[1][:, ::-1]
    rot = ql.T @ g2 @ qr
    m, v = (1 - b1) * rot, (1 - b2) * rot ** 2
    want = ql @ (m / (np.sqrt(v) + eps)) @ qr.T * np.sqrt(1 - b2) / (1 - b1)
    np.testing.assert_allclose(d2, want, rtol=1e-4, atol=1e-4)


def test_bf16_params_keep_float32_statistics():
    tx = S.soap(1e-2, weight_decay=0.1, precondition_1d=True)
    params = {"w": jnp.ones((4, 6), jnp.bfloat16), "b": jnp.ones((4,), jnp.bfloat16)}
    state = tx.init(params)
    assert state.soap.precond["w"].stats[0].dtype == jnp.float32
    g = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size, dtype=p.dtype).reshape(p.shape), params)
    for _ in range(3):
        u, state = tx.update(g, state, params)
    assert u["w"].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(u["w"].astype(jnp.float32))))


def single_device_and_sharded(tx, params, grads, mesh, specs):
    """The parameters after `tx` applied every gradient of `grads` in turn: jitted on one device,
    then on `mesh` with the parameters split as `specs` says."""
    def run(params, grads):
        state = tx.init(params)
        for g in grads:
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
        return params

    want = jax.jit(run)(params, grads)
    with jax.set_mesh(mesh):
        sharding = {k: NamedSharding(mesh, v) for k, v in specs.items()}
        got = jax.jit(run, out_shardings=sharding)(jax.device_put(params, sharding), grads)
    return want, got


def test_jit_on_sharded_mesh_matches_single_device():
    """fsdp/tensor-sharded parameters and statistics through several refreshes (the eigh/QR switch
    once deadlocked XLA:CPU's collectives with a few dozen sharded parameters)."""
    mesh = jax.make_mesh((2, 2, 2, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    rng = np.random.default_rng(5)
    specs = {"w": P("fsdp", None), "u": P(None, "tensor"), "t": P("fsdp", None, "tensor"), "b": P("fsdp")}
    shapes = {"w": (32, 32), "u": (24, 24), "t": (8, 6, 8), "b": (16,)}
    specs = {f"{k}{i}": v for k, v in specs.items() for i in range(6)}
    shapes = {f"{k}{i}": v for k, v in shapes.items() for i in range(6)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    # Every unfolding is square or wide, so the first statistics are full rank: their eigenbases
    # are unique and partitioning (different float rounding) cannot change them.
    grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()} for _ in range(7)]
    tx = S.soap(1e-2, precondition_frequency=2)

    want, got = single_device_and_sharded(tx, params, grads, mesh, specs)
    assert got["w0"].sharding.spec == P("fsdp", None)
    for k in shapes:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_dimensions_split_over_different_mesh_axes_match_single_device():
    """On data 2 x fsdp 4, a [6, 20, 4] tensor's mode-0 statistic splits over data and its mode-1
    over fsdp: the gathered basis of one axis meets the other's split (this once failed to
    compile: shard_map could not infer that the update is replicated over data). float64, every
    unfolding wide, so the first eigenbases are unique; the state laid out as the runner does."""
    mesh = jax.make_mesh((2, 4, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    assert split_axes(6, mesh) == ("data",) and split_axes(20, mesh) == ("fsdp",)
    rng = np.random.default_rng(6)
    shapes = {"a": (6, 20, 4), "b": (20, 6, 4)}
    specs = {"a": P("data"), "b": P("fsdp", "data")}
    with jax.enable_x64(True):
        params = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
        grads = [{k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()} for _ in range(5)]
        tx = S.soap(1e-2, precondition_frequency=2, linalg_dtype=jnp.float64)
        want, got = single_device_and_sharded(tx, params, grads, mesh, specs)
        for k in shapes:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_soap_beats_adam_on_ill_conditioned_quadratic():
    """0.5 tr(E^T A E), E = W - W*, A rotated with condition number 1e4: Adam's diagonal
    scaling cannot undo the rotation; SOAP's left eigenbasis does (the 64-side stays identity)."""
    n, m, steps = 16, 64, 600
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.normal(size=(n, n)))[0]
    a = jnp.asarray(u @ np.diag(np.logspace(0, 4, n)) @ u.T, jnp.float32)
    w_star = jnp.asarray(rng.normal(size=(n, m)), jnp.float32)

    def loss(w):
        e = w - w_star
        return 0.5 * jnp.sum(e * (a @ e))

    def losses(make, lr):
        tx = make(lr)

        def body(carry, _):
            w, s = carry
            u_, s = tx.update(jax.grad(loss)(w), s, w)
            w = w + u_
            return (w, s), loss(w)
        w0 = jnp.zeros((n, m))
        return jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)[1]

    target = 1e-5 * float(loss(jnp.zeros((n, m))))
    makers = {"adam": lambda lr: optax.adam(lr, 0.9, 0.95),
              "soap": lambda lr: S.soap(lr, 0.9, 0.95, weight_decay=0.0, max_precond_dim=32)}
    best = {}
    for name, make in makers.items():
        run = jax.jit(lambda lr, make=make: losses(make, lr))
        hits = []
        for lr in (1e-2, 3e-2, 1e-1, 3e-1):
            below = np.nonzero(np.asarray(run(lr)) < target)[0]
            hits.append(below[0] + 1 if len(below) else steps + 1)
        best[name] = min(hits)
    assert best["adam"] <= steps, best
    assert best["soap"] <= 0.5 * best["adam"], best
