"""Attention against a naive NumPy implementation: packed segments, GQA, rope/alibi/none."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm.config import ConfigError, base_config
from gqlm.models.attention import Attention, attention_mask, resolve_attention_impl

# Row 0: three packed documents then padding; row 1: two documents, no padding.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
POSITIONS = np.array([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0],
                      [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]], np.int32)


def model_cfg(position: str, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 0,
              attention_impl: str = "einsum"):
    cfg = base_config().model
    cfg.update(dict(vocab_size=32, embed_dim=16, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    head_dim=head_dim, position=position, rope_theta=100.0, init_std=0.3,
                    attention_impl=attention_impl))
    return cfg


def numpy_rope(x_THK: np.ndarray, pos_T: np.ndarray, theta: float) -> np.ndarray:
    K = x_THK.shape[-1]
    out = np.array(x_THK, np.float64)
    for t, p in enumerate(pos_T):
        for i in range(K // 2):
            c, s = np.cos(p * theta ** (-2 * i / K)), np.sin(p * theta ** (-2 * i / K))
            a, b = x_THK[t, :, i], x_THK[t, :, i + K // 2]
            out[t, :, i], out[t, :, i + K // 2] = c * a - s * b, s * a + c * b
    return out


def numpy_slopes(n: int) -> np.ndarray:
    assert n & (n - 1) == 0, "test reference covers powers of two only"
    return np.array([2.0 ** (-8.0 * h / n) for h in range(1, n + 1)])


def naive_attention(x_BTD, params, segments, pos, position, theta):
    """Loops over batch, heads and queries with an explicit list of visible keys."""
    q_w, k_w, v_w, o_w = (np.asarray(params[n], np.float64) for n in ("q", "k", "v", "o"))
    H, G, K = q_w.shape[1], k_w.shape[1], q_w.shape[2]
    B, T, _ = x_BTD.shape
    out = np.zeros((B, T, o_w.shape[-1]))
    for b in range(B):
        q = np.einsum("td,dhk->thk", x_BTD[b], q_w)
        k = np.einsum("td,dgk->tgk", x_BTD[b], k_w)
        v = np.einsum("td,dgk->tgk", x_BTD[b], v_w)
        if position == "rope":
            q, k = numpy_rope(q, pos[b], theta), numpy_rope(k, pos[b], theta)
        heads = np.zeros((T, H, K))
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                keys = [s for s in range(t + 1) if segments[b, s] == segments[b, t]]
                scores = np.array([q[t, h] @ k[s, g] / np.sqrt(K) for s in keys])
                if position == "alibi":
                    scores -= numpy_slopes(H)[h] * np.array([pos[b, t] - pos[b, s] for s in keys])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                heads[t, h] = sum(wi * v[s, g] for wi, s in zip(w, keys))
        out[b] = np.einsum("thk,hkd->td", heads, o_w)
    return out


# "xla" runs jax.nn.dot_product_attention's reference path with the same arguments the fused cuDNN
# kernel gets on GPUs (causal flag, segment mask as bias, grouped kv heads), so this checks them.
@pytest.mark.parametrize("attention_impl", ["einsum", "xla"])
@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attention_matches_naive_numpy(position, num_kv_heads, attention_impl):
    cfg = model_cfg(position, num_kv_heads=num_kv_heads, attention_impl=attention_impl)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(2, SEGMENTS.shape[1], 16)).astype(np.float32)
    got = attn(jnp.asarray(x), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS))
    params = {n: getattr(attn, n)[...] for n in ("q", "k", "v", "o")}
    want = naive_attention(x, params, SEGMENTS, POSITIONS, position, cfg.rope_theta)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_explicit_head_dim_shapes_and_numerics():
    cfg = model_cfg("rope", num_heads=2, num_kv_heads=1, head_dim=6)
    attn = Attention(cfg, rngs=nnx.Rngs(3))
    assert attn.q.shape == (16, 2, 6) and attn.k.shape == (16, 1, 6) and attn.o.shape == (2, 6, 16)
    x = np.random.default_rng(2).normal(size=(2, SEGMENTS.shape[1], 16)).astype(np.float32)
    got = attn(jnp.asarray(x), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS))
    params = {n: getattr(attn, n)[...] for n in ("q", "k", "v", "o")}
    want = naive_attention(x, params, SEGMENTS, POSITIONS, "rope", cfg.rope_theta)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_mask_is_causal_and_within_segment():
    mask = np.asarray(attention_mask(jnp.asarray(SEGMENTS)))
    for b in range(2):
        for t in range(SEGMENTS.shape[1]):
            for s in range(SEGMENTS.shape[1]):
                assert mask[b, t, s] == (s <= t and SEGMENTS[b, s] == SEGMENTS[b, t])


@pytest.mark.parametrize("attention_impl", ["einsum", "xla"])
def test_all_padding_row_is_finite_with_finite_grads(attention_impl):
    cfg = model_cfg("alibi", attention_impl=attention_impl)
    graphdef, params = nnx.split(Attention(cfg, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 16)), jnp.float32)
    segments = jnp.asarray([[0, 0, 0, 0, 0], [1, 1, 0, 0, 0]], jnp.int32)
    pos = jnp.zeros((2, 5), jnp.int32)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x, pos, segments) ** 2)

    value, (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves((g_params, g_x)))


def test_auto_attention_is_einsum_off_gpu_and_explicit_choices_pass_through():
    assert jax.devices()[0].platform == "cpu"
    assert resolve_attention_impl("auto", jnp.bfloat16) == "einsum"
    assert resolve_attention_impl("auto", jnp.float32) == "einsum"
    assert resolve_attention_impl("cudnn", jnp.float32) == "cudnn"
    assert resolve_attention_impl("xla", jnp.bfloat16) == "xla"


@pytest.mark.parametrize("compute_dtype,message", [("float32", "model.compute_dtype='bfloat16'"),
                                                   ("bfloat16", "needs a GPU; this is cpu")])
def test_cudnn_attention_it_cannot_run_is_a_config_error_when_traced(compute_dtype, message):
    """Once a RuntimeError ("cuDNN is not detected") from inside JAX. Building the model still
    works off-GPU (a CPU host dry-runs a GPU config); calling it names the key."""
    cfg = model_cfg("rope", attention_impl="cudnn")
    cfg.compute_dtype = compute_dtype
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 4, 16), jnp.float32)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ConfigError, match="model.attention_impl='cudnn'") as info:
        jax.jit(lambda x: attn(x, jnp.arange(4)[None], ids))(x)
    assert message in str(info.value)
