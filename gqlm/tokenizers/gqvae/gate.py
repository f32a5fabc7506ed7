"""The gate g_t = P(a token ends at t) from the gater's logit l_t, in three parametrisations
(`gqvae.gate`); all cut where sigmoid(l) > 0.5, so segmentation (inference) is the same code for each.

- `paper`: g = sigmoid(l), the paper's. Under a push of one sign (the compression term, before
  reconstruction has a stake in where tokens end), Adam moves l at its learning rate whatever the
  gradient's size, to about -20, where sigmoid'(l) ~ 2e-9 is below Adam's epsilon: the gater
  freezes and cannot come back when reconstruction later wants cuts.
- `bounded`: g = sigmoid(clip(l, -c, c)), c = `gqvae.gate_bound`, whose backward pass lets
  through, outside [-c, c], only the gradient that moves l back in (at full slope, not zero):
  nothing drives l further out, and dg/dl >= sigmoid'(c) wherever the loss wants l back inside.
  Inside the box it is the paper's gate exactly.
- `straight_through`: the hard gate 1[sigmoid(l) > 0.5] in the forward pass (the loss sees the tokens the
  tokenizer will cut), the `bounded` gate's gradient in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gqlm.config.gqvae import GATES


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def inward_clip(l_BT: jnp.ndarray, bound: float) -> jnp.ndarray:
    """clip(l, -bound, bound); its gradient passes where it would move l back inside the box."""
    return jnp.clip(l_BT, -bound, bound)


def _inward_clip_fwd(l_BT: jnp.ndarray, bound: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    return jnp.clip(l_BT, -bound, bound), l_BT


def _inward_clip_bwd(bound: float, l_BT: jnp.ndarray, ct_BT: jnp.ndarray) -> tuple[jnp.ndarray]:
    # A descent step moves l by -lr * ct: above the box only ct > 0 brings it back, below only ct < 0.
    outward_BT = ((l_BT > bound) & (ct_BT < 0)) | ((l_BT < -bound) & (ct_BT > 0))
    return (jnp.where(outward_BT, 0.0, ct_BT),)


inward_clip.defvjp(_inward_clip_fwd, _inward_clip_bwd)


def gate_probs(logits_BT: jnp.ndarray, kind: str = "paper", bound: float = 4.0) -> jnp.ndarray:
    """g [B, T] from the gater's logits under parametrisation `kind` (one of GATES)."""
    if kind == "paper":
        return jax.nn.sigmoid(logits_BT)
    soft_BT = jax.nn.sigmoid(inward_clip(logits_BT, bound))
    if kind == "bounded":
        return soft_BT
    if kind == "straight_through":
        # The tokenizer's test (segmenter.py), bit for bit: sigmoid(l) > 0.5 (l > 0 up to rounding).
        hard_BT = (jax.nn.sigmoid(logits_BT) > 0.5).astype(soft_BT.dtype)
        return soft_BT + jax.lax.stop_gradient(hard_BT - soft_BT)
    raise ValueError(f"gqvae.gate={kind!r} is not one of {GATES}")
