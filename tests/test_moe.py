"""MoE router, dispatch and layer against naive per-token references written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm.config import ConfigError, base_config, moe_layer_indices, validate
from gqlm.models import moe_dispatch as md
from gqlm.models import moe_router as mr
from gqlm.models.layers import Mlp
from gqlm.models.moe import MoeMLP, dropless_local, resolve_backend

B, T, D, F, E, K = 2, 6, 8, 16, 4, 2


def model_cfg(**moe):
    c = base_config().model
    c.embed_dim, c.mlp_dim, c.init_std = D, F, 0.3
    c.moe.num_experts, c.moe.top_k = E, K
    for key, value in moe.items():
        c.moe[key] = value
    return c


def make_moe(**moe):
    module = MoeMLP(model_cfg(**moe), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def inputs(seed=1, pad=True):
    x = jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)
    seg = np.ones((B, T), np.int32)
    if pad:
        seg[1, -2:] = 0
    return x, jnp.asarray(seg)


def swiglu(x_D, wg, wu, wo):
    return (jax.nn.silu(x_D @ wg) * (x_D @ wu)) @ wo


def numpy_top_k(p, x_BTD, top_k):
    """The chosen experts per token, from NumPy (outside any grad trace: choices have no grad)."""
    logits = np.einsum("btd,de->bte", np.asarray(x_BTD, np.float64), np.asarray(p["router"], np.float64))
    return np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]


def naive_moe(p, x_BTD, seg_BT, top_k, keep=None, chosen_BTK=None):
    """Per-token loop: route each real token, sum its experts' weighted outputs.

    `keep[b][t][k]` (optional) switches single copies off, as capacity dispatch does.
    """
    if chosen_BTK is None:
        chosen_BTK = numpy_top_k(p, x_BTD, top_k)
    rows = []
    for b in range(x_BTD.shape[0]):
        for t in range(x_BTD.shape[1]):
            x_D = x_BTD[b, t]
            if int(seg_BT[b, t]) == 0:
                rows.append(jnp.zeros_like(x_D))
                continue
            probs = jax.nn.softmax(x_D @ p["router"])
            chosen = chosen_BTK[b, t]
            total = sum(probs[e] for e in chosen)
            y = jnp.zeros_like(x_D)
            for k, e in enumerate(chosen):
                if keep is None or keep[b][t][k]:
                    y = y + probs[e] / total * swiglu(x_D, p["wi_gate"][e], p["wi_up"][e], p["wo"][e])
            rows.append(y)
    return jnp.stack(rows).reshape(x_BTD.shape)


def moe_apply(graphdef, params, x, seg, **kw):
    return nnx.merge(graphdef, params)(x, seg, **kw)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- router


def test_route_topk_renormalised():
    x, _ = inputs()
    router = jax.random.normal(jax.random.key(2), (D, E))
    r = mr.route(x, router, K)
    logits = np.einsum("btd,de->bte", np.asarray(x), np.asarray(router))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., :K]
    assert_close(r.probs_BTE, probs)
    np.testing.assert_array_equal(np.asarray(r.experts_BTK), top)
    chosen = np.take_along_axis(probs, top, -1)
    assert_close(r.weights_BTK, chosen / chosen.sum(-1, keepdims=True))


def test_router_jitter_only_with_key():
    x, _ = inputs()
    router = jax.random.normal(jax.random.key(2), (D, E))
    plain = mr.route(x, router, K)
    no_key = mr.route(x, router, K, jitter=0.5)
    jittered = mr.route(x, router, K, jitter=0.5, jitter_key=jax.random.key(3))
    assert_close(no_key.logits_BTE, plain.logits_BTE, rtol=0, atol=0)
    assert not np.allclose(jittered.logits_BTE, plain.logits_BTE)
    noise = jax.random.uniform(jax.random.key(3), x.shape, jnp.float32, 0.5, 1.5)
    assert_close(jittered.logits_BTE, jnp.einsum("btd,de->bte", x * noise, router))


def test_lb_loss_closed_form_on_hand_made_routing():
    # 4 real tokens + 1 padding, E=2, K=1.
    probs = jnp.array([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.0, 1.0]]])
    experts = jnp.array([[[0], [0], [1], [0], [1]]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
    f = np.array([3 / 4, 1 / 4])
    p = np.array([0.9 + 0.6 + 0.3 + 0.8, 0.1 + 0.4 + 0.7 + 0.2]) / 4
    assert_close(mr.expert_load(experts, mask, 2), f)
    assert_close(mr.load_balancing_loss(probs, experts, mask), 2 * np.sum(f * p))


def test_lb_loss_is_one_for_uniform_routing_and_larger_otherwise():
    e, k = 4, 2
    experts = jnp.array([[[0, 1], [2, 3], [1, 0], [3, 2]]])
    mask = jnp.ones((1, 4))
    uniform = jnp.full((1, 4, e), 1 / e)
    assert_close(mr.load_balancing_loss(uniform, experts, mask), 1.0)
    skewed = jnp.array([[[0.7, 0.1, 0.1, 0.1]] * 4])
    lopsided = jnp.array([[[0, 1]] * 4])
    assert float(mr.load_balancing_loss(skewed, lopsided, mask)) > 1.0 + 1e-3
    del k


def test_z_loss_and_entropy_closed_form_ignore_padding():
    logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [50.0, -50.0, 0.0]]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    lse = np.log(np.exp([1.0, 2.0, 3.0]).sum()), np.log(3.0)
    assert_close(mr.z_loss(logits, mask), (lse[0] ** 2 + lse[1] ** 2) / 2)
    p0 = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    ent = (-(p0 * np.log(p0)).sum() + np.log(3.0)) / 2
    assert_close(mr.router_entropy(jax.nn.softmax(logits), mask), ent)


def test_aux_ignores_padding_tokens():
    graphdef, params = make_moe()
    x, seg = inputs(pad=True)
    _, aux = moe_apply(graphdef, params, x, seg)
    x2 = x.at[1, -2:].set(100.0)  # changes only padding tokens
    _, aux2 = moe_apply(graphdef, params, x2, seg)
    for key in ("lb_loss", "z_loss", "router_entropy", "load", "drop_fraction"):
        assert_close(aux[key], aux2[key])
    real = np.asarray(seg) > 0
    chosen = numpy_top_k(params, x, K)[real]
    f = np.bincount(chosen.ravel(), minlength=E) / chosen.size
    logits = np.asarray(x)[real] @ np.asarray(params["router"])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert_close(aux["load"], f)
    assert_close(aux["lb_loss"], E * np.sum(f * probs.mean(0)))
    assert_close(aux["max_load"], E * jnp.max(aux["load"]))


# ----------------------------------------------------------------------------- expert compute


def random_weights(seed, e=E, d=D, f=F):
    ks = jax.random.split(jax.random.key(seed), 3)
    return md.ExpertWeights(jax.random.normal(ks[0], (e, d, f)) / d**0.5,
                            jax.random.normal(ks[1], (e, d, f)) / d**0.5,
                            jax.random.normal(ks[2], (e, f, d)) / f**0.5)


def test_ragged_equals_row_loop():
    w = random_weights(0)
    group_sizes = jnp.array([5, 0, 7, 2], jnp.int32)  # an empty group, 3 trailing unused rows
    x = jax.random.normal(jax.random.key(1), (17, D))
    owner = np.repeat(np.arange(E), np.asarray(group_sizes))
    loop = [swiglu(x[m], *(a[owner[m]] for a in w)) if m < len(owner) else jnp.zeros(D)
            for m in range(17)]
    assert_close(md.swiglu_ragged(x, group_sizes, w), jnp.stack(loop), rtol=1e-5, atol=1e-5)


def test_block_rows():
    assert md.block_rows(1024, 8) == 32  # a quarter of 1024 / 8 rows per expert
    assert md.block_rows(100, 4) == 8  # 100 / 16 = 6.25, rounded up to a multiple of 8
    assert md.block_rows(10**6, 8) == 256  # capped


def test_block_layout_places_each_expert_in_its_own_blocks():
    expert = jnp.array([2, 0, 2, 4, 2, 1, 2, 2], jnp.int32)  # 4 = no expert; expert 3 empty
    layout = md.block_layout(expert, E, 2)
    # Blocks of 2 rows: expert 0 -> block 0, expert 1 -> block 1, expert 2 (5 copies) -> blocks 2-4.
    np.testing.assert_array_equal(np.asarray(layout.block_end_E), [1, 2, 5, 5])
    np.testing.assert_array_equal(np.asarray(layout.position_M), [4, 0, 5, -1, 6, 2, 7, 8])


@pytest.mark.parametrize("expected_rows,block", [(None, None), (8, 8), (4, 2)])
@pytest.mark.parametrize("routing", ["spread", "one_expert"])
def test_blocked_output_and_grads_match_row_loop(routing, expected_rows, block):
    """Default blocks (8 rows: 4 or 3 used blocks), blocks of 8 rows, and of 2 rows (9 used
    blocks of the 14 the static layout holds): the block loop gives the row loop's outputs and
    gradients, whatever the routing (one expert's 17 copies span many blocks)."""
    w = random_weights(0)
    m = 20
    if routing == "spread":
        expert = jnp.array([3, 0, 4, 3, 1, 0, 4, 2, 1, 1, 2, 3, 0, 4, 2, 2, 3, 1, 0, 3], jnp.int32)
    else:
        expert = jnp.array([2] * 17 + [4] * 3, jnp.int32)  # 4 = no expert
    x = jax.random.normal(jax.random.key(1), (m, D))
    _, counts = md.expert_ranks(expert, E)
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(np.asarray(expert), minlength=E + 1)[:E])

    def loss_blocked(x, w):
        return jnp.sum(jnp.sin(md.swiglu_blocked(x, expert, w, expected_rows, block)))

    def loss_loop(x, w):
        rows = [swiglu(x[i], *(a[int(e)] for a in w)) if e < E else jnp.zeros(D) for i, e in enumerate(expert)]
        return jnp.sum(jnp.sin(jnp.stack(rows)))

    got = jax.jit(jax.value_and_grad(loss_blocked, argnums=(0, 1)))(x, w)
    want = jax.value_and_grad(loss_loop, argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save", [True, False])
def test_swiglu_blocks_runs_only_the_used_blocks(save):
    """Blocks of 3 rows with experts [1, 0, 3, 2]; only the first 3 blocks are used: their rows get
    their block's expert, the rest 0, and gradients (hand-written backward loop, with saved or
    recomputed pre-activations) match autodiff of the same computation written row by row."""
    w = random_weights(0)
    x = jax.random.normal(jax.random.key(1), (12, D))
    expert_q = jnp.array([1, 0, 3, 2], jnp.int32)
    owner = [1, 1, 1, 0, 0, 0, 3, 3, 3, None, None, None]

    def loss_blocks(x, w):
        return jnp.sum(jnp.sin(md.swiglu_blocks(x, expert_q, jnp.int32(3), w, 3, save)))

    def loss_rows(x, w):
        rows = [swiglu(x[m], *(a[e] for a in w)) if e is not None else jnp.zeros(D) for m, e in enumerate(owner)]
        return jnp.sum(jnp.sin(jnp.stack(rows)))

    y = md.swiglu_blocks(x, expert_q, jnp.int32(3), w, 3)
    assert np.all(np.asarray(y[9:]) == 0) and float(jnp.max(jnp.abs(y[:9]))) > 0
    got = jax.jit(jax.value_and_grad(loss_blocks, argnums=(0, 1)))(x, w)
    want = jax.value_and_grad(loss_rows, argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[1][1].gate_EDF[2]) == 0)  # expert 2's block is unused: no gradient


@pytest.mark.parametrize("backend", ["dense", "ragged"])
def test_grouped_swiglu_unsorted_rows_and_invalid_id(backend):
    w = random_weights(0)
    expert = jnp.array([3, 0, 4, 3, 1, 0, 4, 2], jnp.int32)  # 4 = no expert
    x = jax.random.normal(jax.random.key(1), (8, D))
    y = md.grouped_swiglu(x, expert, w, backend)
    ref = [swiglu(x[m], *(a[int(e)] for a in w)) if e < E else jnp.zeros(D) for m, e in enumerate(expert)]
    assert_close(y, jnp.stack(ref), rtol=1e-5, atol=1e-5)


def test_resolve_backend():
    assert resolve_backend("auto") == ("dense" if jax.default_backend() == "cpu" else "ragged")
    assert resolve_backend("ragged") == "ragged"
    assert resolve_backend("dense") == "dense"


# ----------------------------------------------------------------------------- dropless layer


@pytest.mark.parametrize("backend", ["dense", "ragged"])
def test_dropless_output_and_grads_match_per_token_loop(backend):
    graphdef, params = make_moe(backend=backend)
    x, seg = inputs()

    def loss_moe(p, x):
        y, _ = moe_apply(graphdef, p, x, seg)
        return jnp.sum(jnp.sin(y)), y

    chosen = numpy_top_k(params, x, K)

    def loss_ref(p, x):
        y = naive_moe(p, x, seg, K, chosen_BTK=chosen)
        return jnp.sum(jnp.sin(y)), y

    (l1, y1), g1 = jax.value_and_grad(loss_moe, argnums=(0, 1), has_aux=True)(params, x)
    (l2, y2), g2 = jax.value_and_grad(loss_ref, argnums=(0, 1), has_aux=True)(params, x)
    assert_close(y1, y2)
    assert_close(l1, l2)
    assert float(jnp.max(jnp.abs(g2[1]))) > 0
    for key in ("router", "wi_gate", "wi_up", "wo"):
        assert float(jnp.max(jnp.abs(g2[0][key]))) > 0
        assert_close(g1[0][key], g2[0][key], rtol=1e-4, atol=1e-5)
    assert_close(g1[1], g2[1], rtol=1e-4, atol=1e-5)


def test_dense_and_ragged_backends_agree_with_grads():
    w = random_weights(0)
    x, _ = inputs()
    r = mr.route(x, jax.random.normal(jax.random.key(5), (D, E)), K)

    def run(backend):
        f = lambda x, w: jnp.sum(jnp.cos(dropless_local(x, r.experts_BTK, r.weights_BTK, w, backend)))
        return jax.value_and_grad(f, argnums=(0, 1))(x, w)

    for a, b in zip(jax.tree.leaves(run("dense")), jax.tree.leaves(run("ragged"))):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_expert_top1_equals_dense_swiglu():
    graphdef, params = make_moe(num_experts=1, top_k=1)
    x, _ = inputs()
    seg = jnp.ones((B, T), jnp.int32)
    y, aux = moe_apply(graphdef, params, x, seg)
    mlp = Mlp(model_cfg(), rngs=nnx.Rngs(9))
    mlp.wi_gate[...], mlp.wi_up[...], mlp.wo[...] = (params["wi_gate"][0], params["wi_up"][0],
                                                     params["wo"][0])
    assert_close(y, mlp(x))
    assert_close(aux["lb_loss"], 1.0)


def test_shared_expert_adds_dense_swiglu():
    graphdef, params = make_moe(shared_expert=True)
    x, seg = inputs()
    y, _ = moe_apply(graphdef, params, x, seg)
    s = params["shared"]
    shared = jnp.einsum("btf,fd->btd", jax.nn.silu(x @ s["wi_gate"]) * (x @ s["wi_up"]), s["wo"])
    assert_close(y, naive_moe(params, x, seg, K) + shared)


def test_bfloat16_compute_is_close_to_float32():
    graphdef, params = make_moe()
    x, seg = inputs()
    y32, _ = moe_apply(graphdef, params, x, seg)
    cfg = model_cfg()
    cfg.compute_dtype = "bfloat16"
    gd16, _ = nnx.split(MoeMLP(cfg, rngs=nnx.Rngs(0)))
    y16, aux = moe_apply(gd16, params, x, seg)
    assert y16.dtype == jnp.bfloat16 and aux["lb_loss"].dtype == jnp.float32
    assert_close(y16.astype(jnp.float32), y32, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- capacity


def numpy_capacity_keep(experts_BTK, seg_BT, cap):
    """Routing order: slot k = 0 for every token in order, then k = 1, ...; per sequence."""
    b, t, k = experts_BTK.shape
    keep = np.zeros((b, t, k), bool)
    for bi in range(b):
        used = {}
        for ki in range(k):
            for ti in range(t):
                if seg_BT[bi, ti] == 0:
                    continue
                e = experts_BTK[bi, ti, ki]
                keep[bi, ti, ki] = used.get(e, 0) < cap
                used[e] = used.get(e, 0) + 1
    return keep


def test_capacity_formula():
    assert md.capacity(1.25, 6, 2, 4) == math.ceil(1.25 * 6 * 2 / 4) == 4
    assert md.capacity(100.0, 6, 2, 4) == 6  # never more than T


def test_capacity_ranks_follow_routing_order():
    experts = jnp.array([[[0, 1], [0, 2], [1, 0], [0, 1]]])
    valid = jnp.array([[True, True, False, True]])
    ranks = md.capacity_ranks(experts, valid, 3)
    # k=0: tokens 0,1,3 -> expert 0 ranks 0,1,2 (token 2 is padding); k=1: expert 1 ranks 0,1.
    np.testing.assert_array_equal(np.asarray(ranks)[0, [0, 1, 3]], [[0, 0], [1, 0], [2, 1]])


def test_capacity_large_equals_dropless():
    graphdef, params = make_moe()
    gd_cap, _ = make_moe(dispatch="capacity", capacity_factor=float(E))
    x, seg = inputs()
    y1, aux1 = moe_apply(graphdef, params, x, seg)
    y2, aux2 = moe_apply(gd_cap, params, x, seg)
    assert_close(y1, y2)
    assert float(aux2["drop_fraction"]) == 0.0


def test_small_capacity_drops_exactly_the_expected_copies():
    graphdef, params = make_moe(dispatch="capacity", capacity_factor=0.5)
    cap = md.capacity(0.5, T, K, E)
    x, seg = inputs()
    r = mr.route(x, params["router"], K)
    keep = numpy_capacity_keep(np.asarray(r.experts_BTK), np.asarray(seg), cap)
    real = np.asarray(seg)[..., None] > 0
    assert 0 < (~keep & real).sum() < real.sum() * K  # the case really drops some copies
    y, aux = moe_apply(graphdef, params, x, seg)
    assert_close(y, naive_moe(params, x, seg, K, keep=keep))
    assert_close(aux["drop_fraction"], (~keep & real).sum() / (real.sum() * K))


def test_fully_dropped_token_passes_through():
    # Every token routes to the same top-2 experts: with capacity 1 only token 0 is processed.
    graphdef, params = make_moe(dispatch="capacity", capacity_factor=0.01)
    params = dict(params, router=jnp.zeros((D, E)).at[:, 0].set(1.0).at[:, 1].set(0.5))
    x = jnp.abs(jax.random.normal(jax.random.key(1), (B, T, D)))  # positive: experts 0, 1 win
    seg = jnp.ones((B, T), jnp.int32)
    y, aux = moe_apply(graphdef, params, x, seg)
    assert np.all(np.asarray(y)[:, 1:] == 0.0)  # residual x + 0 = x outside the layer
    assert np.all(np.abs(np.asarray(y)[:, 0]) > 0)
    assert_close(aux["drop_fraction"], (T - 1) / T)


def test_capacity_dispatch_and_gather_round_trip():
    x = jax.random.normal(jax.random.key(1), (1, 3, D))
    slot = jnp.array([[[0, 5], [1, 6], [6, 3]]], jnp.int32)  # E*C = 6: two copies not kept
    buf = md.dispatch_capacity(x, slot, 3, 2)
    flat = np.asarray(buf).reshape(6, D)
    for t, s in [(0, 0), (0, 5), (1, 1), (2, 3)]:
        assert_close(flat[s], x[0, t])
    assert np.all(flat[[2, 4]] == 0)
    back = np.asarray(md.gather_capacity(buf, slot))
    assert_close(back[0, 0, 1], x[0, 0])
    assert np.all(back[0, 1, 1] == 0) and np.all(back[0, 2, 0] == 0)


def test_pack_for_devices_places_every_copy_once():
    x = jax.random.normal(jax.random.key(1), (7, D))
    expert = jnp.array([3, 0, 2, 4, 1, 3, 2], jnp.int32)  # G=2 devices x L=2 experts; 4 = none
    send, local, slot, src = md.pack_for_devices(x, expert, 2, 2)
    # Device 0 gets copies 1, 4 (experts 0, 1); device 1 gets copies 0, 2, 5, 6 in token order.
    np.testing.assert_array_equal(np.asarray(local), [[0, 1, 2, 2, 2, 2, 2], [1, 0, 1, 0, 2, 2, 2]])
    assert_close(send[0, :2], x[jnp.array([1, 4])])
    assert_close(send[1, :4], x[jnp.array([0, 2, 5, 6])])
    assert np.all(np.asarray(send[0, 2:]) == 0) and np.all(np.asarray(send[1, 4:]) == 0)
    # slot = device * M + position among that device's copies; M * G for the copy not sent.
    np.testing.assert_array_equal(np.asarray(slot), [7, 0, 8, 14, 1, 9, 10])
    np.testing.assert_array_equal(np.asarray(src), [1, 4, 7, 7, 7, 7, 7, 0, 2, 5, 6, 7, 7, 7])


# ----------------------------------------------------------------------------- config errors


def check(config, match, devices=8):
    with pytest.raises(ConfigError, match=match):
        validate(config, devices)


def moe_config(**moe):
    c = base_config()
    c.model.moe.num_experts = 8
    for key, value in moe.items():
        c.model.moe[key] = value
    return c


def test_config_errors():
    c = moe_config()
    c.mesh.expert = 4
    validate(c, 8)  # fine
    c.model.moe.num_experts = 6
    c.mesh.data, c.mesh.expert = 2, 4
    check(c, r"model.moe.num_experts=6 is not divisible by mesh.expert=4")
    check(moe_config(top_k=9), r"model.moe.top_k=9")
    check(moe_config(top_k=0), r"model.moe.top_k=0")
    check(moe_config(capacity_factor=0.0), r"model.moe.capacity_factor=0.0")
    check(moe_config(dispatch="dropsome"), r"model.moe.dispatch='dropsome'")
    check(moe_config(backend="cuda"), r"model.moe.backend='cuda'")
    check(moe_config(layers=(1, 7)), r"model.moe.layers contains 7")


def test_moe_layer_indices():
    c = moe_config(every=2).model
    assert moe_layer_indices(c) == (1, 3)
    c.moe.layers = (0, 2)
    assert moe_layer_indices(c) == (0, 2)
