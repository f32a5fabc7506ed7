"""Position information: RoPE, ALiBi, or none (NoPE), chosen by `model.position`.

B batch, T query length, S key length, H heads, K head dim.

Both schemes read `positions_BT`, which restart at 0 in every packed document, so a document sees
the same positions whether it is packed with others or runs alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/K) for i < K/2, as a float32 NumPy constant."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[i], x[i + K/2]) by angle position * theta^(-2i/K) (half-split layout).

    Computed in float32, returned in x's dtype.
    """
    inv_freq_J = jnp.asarray(rope_inv_frequencies(x_BTHK.shape[-1], theta))
    angle_BTJ = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq_J[None, None, :]
    sin_BT1J = jnp.sin(angle_BTJ)[:, :, None, :]
    cos_BT1J = jnp.cos(angle_BTJ)[:, :, None, :]
    x1_BTHJ, x2_BTHJ = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out_BTHK = jnp.concatenate(
        [x1_BTHJ * cos_BT1J - x2_BTHJ * sin_BT1J, x2_BTHJ * cos_BT1J + x1_BTHJ * sin_BT1J], axis=-1)
    return out_BTHK.astype(x_BTHK.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes (Press et al.): 2^(-8h/n) for h = 1..n when n is a power of two.

    Otherwise the slopes of the nearest lower power of two n', followed by every other slope of
    2n', as in the paper's reference code.
    """
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(lower)
    if lower < num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(slopes, np.float32)


def alibi_bias(num_heads: int, positions_BT: jax.Array) -> jax.Array:
    """float32 bias_BHTS = -slope_h * (pos_t - pos_s): penalises keys by their distance.

    Pairs across documents get a meaningless value; the segment mask removes them.
    """
    slopes_H = jnp.asarray(alibi_slopes(num_heads))
    pos_BT = positions_BT.astype(jnp.float32)
    distance_BTS = pos_BT[:, :, None] - pos_BT[:, None, :]
    return -slopes_H[None, :, None, None] * distance_BTS[:, None, :, :]
