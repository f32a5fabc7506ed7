"""SOAP's block-diagonal preconditioner (optimizer.max_precond_block) against unblocked SOAP.

Blocks that cover whole dimensions change nothing (bit-identical states and updates); smaller
blocks give exactly what unblocked SOAP gives when every block is a parameter of its own (an
independent reference: NumPy slices of the parameter fed to the unblocked transform); the
sharded step on the 8-device mesh, with the state shardings of `opt_state_shardings`, matches
the single-device one.

Every block's first statistics are full rank (square 2-D blocks; 3-D blocks whose sides are at
most the product of the others; a larger side above max_precond_dim where a block is not square),
so the initial eigenbases are unique up to column signs and both sides compute the same ones.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gqlm.config import MESH_AXES, ConfigError, base_config
from gqlm.config.optimizer import validate
from gqlm.optim import soap as S
from gqlm.optim.factory import make_optimizer, opt_state_shardings
from gqlm.optim.soap_blocks import BlockedPreconditioner, block_regions, from_blocks, to_blocks


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _numpy_blocks(shape, block):
    """The blocks' index tuples, in row-major order over the grid: cuts every `block` along each
    dimension (the last block of a dimension may be smaller)."""
    per_dim = [[slice(s, min(s + block, n)) for s in range(0, n, block)] for n in shape]
    return list(itertools.product(*per_dim))


def _run(tx, params, grads):
    """(updates of every call, final params) of `tx` from `params` through `grads`."""
    state, outs = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, params, state


def test_blocks_tile_the_parameter():
    """to_blocks stacks the NumPy blocks of each region in row-major order; from_blocks inverts it."""
    x = np.arange(20 * 7 * 19, dtype=np.float32).reshape(20, 7, 19)
    regions = block_regions(x.shape, 8)
    assert len(regions) == 2 * 1 * 2  # 20 = 8+8+4, 7 whole, 19 = 8+8+3
    got = [np.asarray(b) for r in regions for b in to_blocks(jnp.asarray(x), r)]
    # Row-major over the regions (full blocks, then the remainder, per dimension), then over
    # each region's blocks: sort the NumPy blocks alike.
    def order(idx):
        remainder = tuple(i.stop - i.start < 8 < n for i, n in zip(idx, x.shape))
        return remainder + tuple(i.start for i in idx)
    want = sorted(_numpy_blocks(x.shape, 8), key=order)
    assert len(got) == len(want) == 3 * 1 * 3
    for block, idx in zip(got, want):
        np.testing.assert_array_equal(block, x[idx])
    back = from_blocks([to_blocks(jnp.asarray(x), r) for r in regions], regions)
    np.testing.assert_array_equal(back, x)
    assert block_regions((20, 7), 0) == () and block_regions((8, 7), 8) == ()


def test_blocks_covering_whole_dimensions_are_bit_identical():
    """max_precond_block >= every dimension: the reference algorithm, bit for bit, through
    refreshes (every 2 steps), with weight decay, a 3-D tensor and a bias."""
    rng = np.random.default_rng(0)
    shapes = {"w": (24, 16), "t": (4, 6, 8), "b": (24,)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()} for _ in range(7)]
    opts = dict(weight_decay=0.1, precondition_frequency=2, precondition_1d=True)
    want_u, want_p, want_s = _run(S.soap(1e-2, **opts), params, grads)
    for block in (24, 100):  # exactly the longest dimension, and beyond
        got_u, got_p, got_s = _run(S.soap(1e-2, max_precond_block=block, **opts), params, grads)
        assert jax.tree.structure(got_s) == jax.tree.structure(want_s)
        for got, want in [(got_u, want_u), (got_p, want_p), (got_s, want_s)]:
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(a, b)


CASES = {  # name: (shape, block, scale_by_soap options)
    "grid": ((32, 48), 16, {}),  # one region: a 2 x 3 grid of 16 x 16 blocks
    "ragged_3d": ((12, 12, 10), 8, dict(normalize_grads=True)),  # 8 regions of 8- and 4/2-wide sides
    "mixed": ((20, 20), 8, dict(max_precond_dim=4)),  # 8x8 blocks plain Adam, 8x4 one-sided, 4x4 both
    "merged": ((4, 4, 32), 16, dict(merge_dims=True, max_precond_dim=16)),  # blocks 4x4x16 -> 16x16
    "bias": ((40,), 16, {}),  # plain Adam per block
}


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_equal_independent_soap_per_block(x64, name):
    """Blocked SOAP on a parameter = unblocked SOAP on each block as a parameter of its own."""
    shape, block, opts = CASES[name]
    opts = dict(weight_decay=0.1, precondition_frequency=3, linalg_dtype=jnp.float64, **opts)
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=shape)
    noise = [rng.normal(size=shape) for _ in range(10)]
    blocks = _numpy_blocks(shape, block)
    assert len(blocks) > 1

    tx = S.soap(3e-2, max_precond_block=block, **opts)
    w, state = jnp.asarray(w0), None
    state = tx.init(w)
    assert isinstance(state.soap.precond, BlockedPreconditioner)
    ref_tx = S.soap(3e-2, **opts)  # unblocked, one parameter per block
    ref = {i: jnp.asarray(w0[idx]) for i, idx in enumerate(blocks)}
    ref_state = ref_tx.init(ref)
    step, ref_step = jax.jit(tx.update), jax.jit(ref_tx.update)
    for z in noise:
        u, state = step(jnp.asarray(z) + 0.5 * w, state, w)
        ref_g = {i: jnp.asarray(z[idx]) + 0.5 * ref[i] for i, idx in enumerate(blocks)}
        ref_u, ref_state = ref_step(ref_g, ref_state, ref)
        want = np.zeros(shape)
        for i, idx in enumerate(blocks):
            want[idx] = ref_u[i]
        np.testing.assert_allclose(u, want, rtol=0, atol=1e-11)
        w, ref = optax.apply_updates(w, u), optax.apply_updates(ref, ref_u)
    assert not np.allclose(np.asarray(w), w0, atol=1e-3)  # really moved


def test_blocked_sharded_step_matches_single_device():
    """fsdp/tensor-sharded parameters with blocked state laid out by opt_state_shardings through
    several refreshes, beside unblocked ones. Blocks are dealt out whole over the mesh axes that
    divide their count; statistic rows (basis columns) split over the remaining axes."""
    mesh = jax.make_mesh((2, 2, 2, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    rng = np.random.default_rng(5)
    specs = {"w": P("fsdp", None), "v": P(None, "fsdp"), "t": P("fsdp", None, "tensor"), "b": P("fsdp"),
             "small": P(None, "tensor")}
    shapes = {"w": (64, 32), "v": (32, 16), "t": (24, 12, 12), "b": (40,), "small": (16, 16)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()} for _ in range(7)]
    tx = S.soap(1e-2, precondition_frequency=2, max_precond_block=16)

    def run(params, state, grads):
        for g in grads:
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
        return params

    want = jax.jit(run)(params, tx.init(params), grads)
    with jax.set_mesh(mesh):
        sharding = {k: NamedSharding(mesh, v) for k, v in specs.items()}
        state_sharding = opt_state_shardings(tx, params, sharding, mesh)
        precond = state_sharding.soap.precond
        every = ("data", "fsdp", "tensor")
        assert precond["w"].parts[0].stats[0].spec == P(every, None, None)  # 8 blocks: one a device
        assert precond["v"].parts[0].stats[0].spec == P("data", ("fsdp", "tensor"), None)  # 2 blocks
        assert precond["v"].parts[0].bases[1].spec == P("data", None, ("fsdp", "tensor"))
        assert precond["t"].parts[1].stats[0].spec == P(None, every, None)  # 1 block (8 x 12 x 12)
        sharded = jax.device_put(params, sharding)
        state = jax.jit(tx.init, out_shardings=state_sharding)(sharded)
        got = jax.jit(run, out_shardings=sharding)(sharded, state, grads)
    assert isinstance(state.soap.precond["t"], BlockedPreconditioner)
    assert not isinstance(state.soap.precond["small"], BlockedPreconditioner)
    for k in shapes:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_config_reaches_soap_and_is_checked():
    o = base_config().optimizer
    o.update(dict(name="soap", max_precond_block=16))
    tx, _ = make_optimizer(o, 10, {"w": jax.ShapeDtypeStruct((40, 8), jnp.float32)})
    precond = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((40, 8), jnp.float32)})[1].soap.precond["w"]
    assert [p.stats[0].shape for p in precond.parts] == [(2, 16, 16), (1, 8, 8)]  # 40 = 16 + 16 + 8
    o.max_precond_block = -1
    with pytest.raises(ConfigError) as err:
        validate(o)
    assert "optimizer.max_precond_block=-1" in str(err.value) and "\n" not in str(err.value)
