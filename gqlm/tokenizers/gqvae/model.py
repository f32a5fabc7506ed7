"""GQ-VAE: byte encoder, quantizer, gater and decoder (Flax NNX).

Shapes: B pretoken pieces, T byte positions (max_pretoken_len), S/U query/key positions,
D embed dim, F mlp dim, H heads, K head dim, M max token length (the paper's K),
C codebook size, W conv width.

The encoder (bidirectional ALiBi transformer) gives z_t per byte; the quantizer snaps it to the
nearest code e_t; the gater reads the codes and says g_t = P(a token ends at t); the decoder reads
only the code at t and predicts the up-to-M bytes of the token ending at t plus which of them
belong to it. The decoder sees one code only, so each code names one byte string: the codebook is
the tokenizer's candidate vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gqlm.config import ConfigDict
from gqlm.tokenizers.gqvae.gate import gate_probs
from gqlm.tokenizers.gqvae.quantizer import Quantizer

NUM_BYTES = 256
CONV_WIDTH = 3


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, sharding_names=names, eager_sharding=False)


def zeros(shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), sharding_names=names, eager_sharding=False)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Geometric slopes 2^(-8 i / H), i = 1..H (Press et al.)."""
    return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def alibi_bias(num_heads: int, length: int) -> jnp.ndarray:
    """[H, S, U] symmetric (bidirectional) ALiBi bias -slope_h * |s - u|."""
    pos = np.arange(length)
    dist_SU = np.abs(pos[:, None] - pos[None, :])
    return jnp.asarray(-alibi_slopes(num_heads)[:, None, None] * dist_SU, jnp.float32)


def lead(x: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """`x` with leading unit axes up to `ndim` (explicit broadcasting; rank promotion raises)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), sharding_names=("norm",), eager_sharding=False)

    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        var_BT1 = jnp.mean(jnp.square(x_BTD), axis=-1, keepdims=True)
        return x_BTD * jax.lax.rsqrt(var_BT1 + 1e-6) * lead(self.scale[...], x_BTD.ndim)


class Block(nnx.Module):
    """Pre-norm bidirectional transformer block with ALiBi and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, rngs: nnx.Rngs):
        k = dim // heads
        self.heads = heads
        self.attn_norm = RMSNorm(dim)
        self.wq = param(rngs, (dim, heads, k), ("embed", "heads", "kv"), dim ** -0.5)
        self.wk = param(rngs, (dim, heads, k), ("embed", "heads", "kv"), dim ** -0.5)
        self.wv = param(rngs, (dim, heads, k), ("embed", "heads", "kv"), dim ** -0.5)
        self.wo = param(rngs, (heads, k, dim), ("heads", "kv", "embed"), dim ** -0.5)
        self.mlp_norm = RMSNorm(dim)
        self.w_in = param(rngs, (dim, mlp_dim), ("embed", "mlp"), dim ** -0.5)
        self.w_out = param(rngs, (mlp_dim, dim), ("mlp", "embed"), mlp_dim ** -0.5)

    def __call__(self, x_BTD: jnp.ndarray, valid_BT: jnp.ndarray) -> jnp.ndarray:
        h_BTD = self.attn_norm(x_BTD)
        q_BSHK = jnp.einsum("bsd,dhk->bshk", h_BTD, self.wq[...])
        k_BUHK = jnp.einsum("bud,dhk->buhk", h_BTD, self.wk[...])
        v_BUHK = jnp.einsum("bud,dhk->buhk", h_BTD, self.wv[...])
        scores_BHSU = jnp.einsum("bshk,buhk->bhsu", q_BSHK, k_BUHK) / np.sqrt(q_BSHK.shape[-1])
        scores_BHSU = scores_BHSU + alibi_bias(self.heads, x_BTD.shape[1])[None]
        scores_BHSU = jnp.where(valid_BT[:, None, None, :], scores_BHSU, -1e9)
        probs_BHSU = jax.nn.softmax(scores_BHSU, axis=-1)
        attn_BSHK = jnp.einsum("bhsu,buhk->bshk", probs_BHSU, v_BUHK)
        x_BTD = x_BTD + jnp.einsum("bshk,hkd->bsd", attn_BSHK, self.wo[...])
        h_BTF = jax.nn.gelu(self.mlp_norm(x_BTD) @ self.w_in[...])
        return x_BTD + h_BTF @ self.w_out[...]


class Encoder(nnx.Module):
    """Bytes -> one vector per position."""

    def __init__(self, cfg: ConfigDict, rngs: nnx.Rngs):
        self.embed = param(rngs, (NUM_BYTES + 1, cfg.embed_dim), ("vocab", "embed"), 1.0)
        self.blocks = nnx.List([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, rngs)
                                for _ in range(cfg.encoder_layers)])
        self.norm = RMSNorm(cfg.embed_dim)

    def __call__(self, bytes_BT: jnp.ndarray, valid_BT: jnp.ndarray) -> jnp.ndarray:
        x_BTD = jnp.take(self.embed[...], bytes_BT, axis=0)
        for block in self.blocks:
            x_BTD = block(x_BTD, valid_BT)
        return self.norm(x_BTD)


class Gater(nnx.Module):
    """Codes -> logit of P(token ends at t): ALiBi blocks, then 3 same-padded Conv1d layers."""

    def __init__(self, cfg: ConfigDict, rngs: nnx.Rngs):
        d, w = cfg.embed_dim, CONV_WIDTH
        self.blocks = nnx.List([Block(d, cfg.num_heads, cfg.mlp_dim, rngs) for _ in range(cfg.gater_layers)])
        self.norm = RMSNorm(d)
        self.conv = nnx.List([param(rngs, (w, d, d), (None, "embed", "mlp"), (w * d) ** -0.5),
                              param(rngs, (w, d, d), (None, "mlp", "embed"), (w * d) ** -0.5),
                              param(rngs, (w, d, 1), (None, "embed", None), (w * d) ** -0.5)])
        self.conv_bias = nnx.List([zeros((d,), ("mlp",)), zeros((d,), ("embed",)), zeros((1,), (None,))])

    def __call__(self, q_BTD: jnp.ndarray, valid_BT: jnp.ndarray) -> jnp.ndarray:
        x_BTD = q_BTD
        for block in self.blocks:
            x_BTD = block(x_BTD, valid_BT)
        x_BTD = self.norm(x_BTD)
        for i, (w_WDE, b_E) in enumerate(zip(self.conv, self.conv_bias)):
            x_BTD = conv1d_same(x_BTD * valid_BT[..., None], w_WDE[...]) + lead(b_E[...], 3)
            if i < len(self.conv) - 1:
                x_BTD = jax.nn.gelu(x_BTD)
        return x_BTD[..., 0]


def conv1d_same(x_BTD: jnp.ndarray, w_WDE: jnp.ndarray) -> jnp.ndarray:
    """Centered 1-D convolution with zero padding (output length = input length)."""
    width, t = w_WDE.shape[0], x_BTD.shape[1]
    left = (width - 1) // 2
    pad_BTD = jnp.pad(x_BTD, ((0, 0), (left, width - 1 - left), (0, 0)))
    shifted_WBTD = jnp.stack([pad_BTD[:, i:i + t] for i in range(width)])
    return jnp.einsum("wbtd,wde->bte", shifted_WBTD, w_WDE)


class Decoder(nnx.Module):
    """Code at t -> logits of the M bytes ending at t, and of which of them are in the token."""

    def __init__(self, cfg: ConfigDict, rngs: nnx.Rngs):
        d, f, m = cfg.embed_dim, cfg.mlp_dim, cfg.max_token_len
        self.norm = RMSNorm(d)
        self.w_in = param(rngs, (d, f), ("embed", "mlp"), d ** -0.5)
        self.b_in = zeros((f,), ("mlp",))
        self.w_bytes = param(rngs, (f, m, NUM_BYTES), ("mlp", None, "vocab"), f ** -0.5)
        self.b_bytes = zeros((m, NUM_BYTES), (None, "vocab"))
        self.w_len = param(rngs, (f, m), ("mlp", None), f ** -0.5)
        self.b_len = zeros((m,), (None,))

    def __call__(self, q_BTD: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        h_BTF = jax.nn.gelu(self.norm(q_BTD) @ self.w_in[...] + lead(self.b_in[...], 3))
        byte_logits_BTMV = jnp.einsum("btf,fmv->btmv", h_BTF, self.w_bytes[...]) + lead(self.b_bytes[...], 4)
        len_logits_BTM = h_BTF @ self.w_len[...] + lead(self.b_len[...], 3)
        return byte_logits_BTMV, len_logits_BTM


class GQVAE(nnx.Module):
    def __init__(self, cfg: ConfigDict, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg, rngs)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.embed_dim, rngs)
        self.gater = Gater(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)


def valid_mask(lengths_B: jnp.ndarray, length: int) -> jnp.ndarray:
    return jnp.arange(length)[None, :] < lengths_B[:, None]


def finalize_gates(g_BT: jnp.ndarray, lengths_B: jnp.ndarray) -> jnp.ndarray:
    """A token always ends at the piece's last byte; no gate past it."""
    t_1T = jnp.arange(g_BT.shape[1])[None, :]
    last_BT = t_1T == lengths_B[:, None] - 1
    return jnp.where(last_BT, 1.0, jnp.where(t_1T < lengths_B[:, None], g_BT, 0.0))


def fixed_gates(lengths_B: jnp.ndarray, length: int, every: int) -> jnp.ndarray:
    """The VQ-VAE baseline's gates: a token end every `every` bytes (and at the last byte)."""
    t_1T = jnp.arange(length)[None, :]
    g_BT = jnp.broadcast_to(((t_1T + 1) % every == 0).astype(jnp.float32), (lengths_B.shape[0], length))
    return finalize_gates(g_BT, lengths_B)


def hard_boundaries(g_BT: jnp.ndarray, lengths_B: jnp.ndarray, max_token_len: int,
                    threshold: float = 0.5) -> jnp.ndarray:
    """bool [B, T]: token ends where g > threshold, at the last byte, and wherever a token would
    otherwise exceed `max_token_len` bytes."""
    t_T = jnp.arange(g_BT.shape[1])

    def step(run_B, inputs):
        g_B, t = inputs
        in_piece_B = t < lengths_B
        end_B = in_piece_B & ((g_B > threshold) | (run_B + 1 >= max_token_len) | (t == lengths_B - 1))
        return jnp.where(end_B, 0, run_B + 1), end_B

    _, ends_TB = jax.lax.scan(step, jnp.zeros(lengths_B.shape, jnp.int32), (g_BT.T, t_T))
    return ends_TB.T


def forward(model: GQVAE, bytes_BT: jnp.ndarray, lengths_B: jnp.ndarray, quantize: Any,
            fixed_gate_every: int = 0, gate: str = "paper", gate_bound: float = 4.0) -> dict[str, jnp.ndarray]:
    """Full pass. `quantize` (traced bool) False = warm-up: the gater and decoder see z itself.
    `gate`, `gate_bound`: the gate's parametrisation (gate.py)."""
    valid_BT = valid_mask(lengths_B, bytes_BT.shape[1])
    z_BTD = model.encoder(bytes_BT, valid_BT)
    codes_BT, e_BTD = model.quantizer(z_BTD)
    q_BTD = jnp.where(quantize, z_BTD + jax.lax.stop_gradient(e_BTD - z_BTD), z_BTD)
    if fixed_gate_every:
        logits_BT = jnp.zeros(bytes_BT.shape, jnp.float32)
        g_BT = fixed_gates(lengths_B, bytes_BT.shape[1], fixed_gate_every)
    else:
        logits_BT = model.gater(q_BTD, valid_BT)
        g_BT = finalize_gates(gate_probs(logits_BT, gate, gate_bound), lengths_B)
    byte_logits_BTMV, len_logits_BTM = model.decoder(q_BTD)
    return dict(z=z_BTD, e=e_BTD, codes=codes_BT, gates=g_BT, gate_logits=logits_BT, valid=valid_BT,
                byte_logits=byte_logits_BTMV, len_logits=len_logits_BTM)


def segment(model: GQVAE, bytes_BT: jnp.ndarray, lengths_B: jnp.ndarray, max_token_len: int,
            fixed_gate_every: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Inference: (token-end booleans [B, T], codes [B, T]) with quantization on."""
    valid_BT = valid_mask(lengths_B, bytes_BT.shape[1])
    codes_BT, e_BTD = model.quantizer(model.encoder(bytes_BT, valid_BT))
    if fixed_gate_every:
        g_BT = fixed_gates(lengths_B, bytes_BT.shape[1], fixed_gate_every)
    else:
        g_BT = finalize_gates(jax.nn.sigmoid(model.gater(e_BTD, valid_BT)), lengths_B)
    return hard_boundaries(g_BT, lengths_B, max_token_len), codes_BT


def make_model(cfg: ConfigDict, seed: Any = 0) -> GQVAE:
    """The model of a `gqvae` config section; `seed` is an int or a PRNG key."""
    return GQVAE(cfg, nnx.Rngs(params=seed))


def split_params(model: GQVAE) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params as a pure dict) of a model."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_model(cfg: ConfigDict) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params as ShapeDtypeStructs) of a `gqvae` section's model; nothing allocated."""
    return split_params(nnx.eval_shape(lambda: make_model(cfg)))
