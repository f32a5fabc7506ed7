"""The GQ-VAE segmenter: where a trained model cuts byte pieces into tokens, and where it runs.

Shapes: B (or R) pieces, T (or L) byte positions, N flattened positions, C codebook size,
D embed dim, G/K blocks of codes and codes per block.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gqlm.tokenizers.gqvae.model import GQVAE, finalize_gates, fixed_gates, hard_boundaries, valid_mask


def nearest_codes(z_ND: jnp.ndarray, codebook_CD: jnp.ndarray) -> jnp.ndarray:
    """[N] int32 argmin_c ||z - e_c||^2 (ties: the lowest index), the quantizer's, ~2x faster on
    XLA:CPU, where index-tracking reductions are slow: a plain max over each of G blocks of codes,
    then an index reduction only over the block maxima and inside the winning block."""
    # The quantizer's expansion ||e||^2 - 2 z.e, negated exactly: the largest score is the nearest.
    score_NC = 2.0 * (z_ND @ codebook_CD.T) - jnp.sum(jnp.square(codebook_CD), -1)[None, :]
    n, c = score_NC.shape
    g = next(k for k in (64, 32, 16, 8, 4, 2, 1) if c % k == 0)
    score_NGK = score_NC.reshape(n, g, c // g)
    block_N = jnp.argmax(jnp.max(score_NGK, axis=-1), axis=-1)  # the first block holding the maximum
    inner_N = jnp.argmax(jnp.take_along_axis(score_NGK, block_N[:, None, None], axis=1)[:, 0], axis=-1)
    return (block_N * (c // g) + inner_N).astype(jnp.int32)


def segment_pieces(model: GQVAE, bytes_BT: jnp.ndarray, lengths_B: jnp.ndarray, max_token_len: int,
                   fixed_gate_every: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(token-end booleans [B, T], codes [B, T]): `model.segment` with the faster `nearest_codes`."""
    valid_BT = valid_mask(lengths_B, bytes_BT.shape[1])
    z_BTD = model.encoder(bytes_BT, valid_BT)
    codebook_CD = model.quantizer.codebook[...]
    b, t, d = z_BTD.shape
    codes_BT = nearest_codes(z_BTD.reshape(b * t, d), codebook_CD).reshape(b, t)
    if fixed_gate_every:
        g_BT = fixed_gates(lengths_B, t, fixed_gate_every)
    else:
        e_BTD = jnp.take(codebook_CD, codes_BT, axis=0)
        g_BT = finalize_gates(jax.nn.sigmoid(model.gater(e_BTD, valid_BT)), lengths_B)
    return hard_boundaries(g_BT, lengths_B, max_token_len), codes_BT


@functools.lru_cache(maxsize=16)
def jitted_segmenter(graphdef: nnx.GraphDef, max_token_len: int, fixed_gate_every: int, ends_only: bool) -> Any:
    """`segment_pieces` jitted over (params, bytes, lengths); shared by tokenizers of one model,
    so a freshly loaded tokenizer reuses the compiled shapes."""
    def run(params, bytes_BT, lengths_B):
        out = segment_pieces(nnx.merge(graphdef, params), bytes_BT, lengths_B, max_token_len, fixed_gate_every)
        return out[0] if ends_only else out
    return jax.jit(run)


def fixed_cuts(params: Any, bytes_RL: np.ndarray, lengths_R: np.ndarray, every: int) -> np.ndarray:
    """The fixed-gate baseline's token ends [R, L]: every `every` bytes and at each piece's last
    byte (`every` <= max_token_len, so the length cap adds none)."""
    del params
    t_1L = np.arange(bytes_RL.shape[1])[None, :]
    inside_RL = t_1L < lengths_R[:, None]
    return inside_RL & (((t_1L + 1) % every == 0) | (t_1L == lengths_R[:, None] - 1))


def model_devices() -> list[Any]:
    """Where the model runs: with a CPU backend, one device per core at most (batches spread
    over them run in parallel; XLA:CPU runs one device's calls one after another); otherwise
    the default device."""
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        return devices[:1]
    return devices[:max(1, min(len(devices), os.cpu_count() or 1))]
