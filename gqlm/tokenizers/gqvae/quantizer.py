"""Vector quantizer: nearest codebook entry, VQ losses, dead-code re-seeding.

Shapes: B batch, T positions, D embed dim, C codebook size, N recent encoder outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Quantizer(nnx.Module):
    def __init__(self, codebook_size: int, dim: int, rngs: nnx.Rngs):
        # Unit-variance init matches the scale of the encoder's RMS-normalised outputs.
        value = jax.random.normal(rngs.params(), (codebook_size, dim), jnp.float32)
        self.codebook = nnx.Param(value, sharding_names=("vocab", "embed"), eager_sharding=False)

    def __call__(self, z_BTD: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(codes [B, T], e = codebook[codes] [B, T, D]); no straight-through here."""
        codebook_CD = self.codebook[...]
        codes_BT = nearest_codes(z_BTD, codebook_CD)
        return codes_BT, jnp.take(codebook_CD, codes_BT, axis=0)


def nearest_codes(z_BTD: jnp.ndarray, codebook_CD: jnp.ndarray) -> jnp.ndarray:
    """argmin_c ||z - e_c||^2, expanded as ||e_c||^2 - 2 z.e_c (||z||^2 is constant per row)."""
    sq_11C = jnp.sum(jnp.square(codebook_CD), axis=-1)[None, None, :]
    dist_BTC = sq_11C - 2.0 * jnp.einsum("btd,cd->btc", z_BTD, codebook_CD)
    return jnp.argmin(dist_BTC, axis=-1).astype(jnp.int32)


def code_counts(codes_BT: jnp.ndarray, valid_BT: jnp.ndarray, codebook_size: int) -> jnp.ndarray:
    """[C] float32: how often each code is used at valid positions."""
    return jnp.zeros((codebook_size,), jnp.float32).at[codes_BT.reshape(-1)].add(
        valid_BT.reshape(-1).astype(jnp.float32))


def reseed_codebook(codebook_CD: jnp.ndarray, counts_C: jnp.ndarray, recent_ND: jnp.ndarray,
                    rng: jax.Array, recent_valid_N: jnp.ndarray | None = None) -> jnp.ndarray:
    """Codes with zero usage are replaced by randomly drawn recent encoder outputs; used codes are
    kept bit for bit. `recent_valid_N` marks which rows of `recent_ND` are real (not padding).
    Dead codes get distinct rows while there are enough valid ones (then the rows repeat)."""
    n = recent_ND.shape[0]
    valid_N = jnp.ones((n,), bool) if recent_valid_N is None else recent_valid_N
    n_valid = jnp.sum(valid_N)
    # Valid rows first, in random order (Gumbel keys); the k-th dead code takes the k-th of them.
    order_N = jnp.argsort(jnp.where(valid_N, -jax.random.gumbel(rng, (n,)), jnp.inf))
    dead_C = counts_C == 0
    rank_C = jnp.cumsum(dead_C) - 1
    picks_C = order_N[rank_C % jnp.maximum(n_valid, 1)]
    replace_C1 = (dead_C & (n_valid > 0))[:, None]
    return jnp.where(replace_C1, recent_ND[picks_C].astype(codebook_CD.dtype), codebook_CD)
