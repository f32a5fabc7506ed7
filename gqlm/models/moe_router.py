"""MoE router: top-k routing and its auxiliary statistics, all in float32.

B batch, T length, D model dim, E experts, K experts per token (top_k).

Padding tokens (segment id 0) are routed like any other token (their outputs are discarded by the
loss), but they never count in the losses or statistics: every mean here is over real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    logits_BTE: jax.Array  # float32 router logits
    probs_BTE: jax.Array  # softmax(logits)
    experts_BTK: jax.Array  # int32, the K chosen experts, best first
    weights_BTK: jax.Array  # float32, their probabilities renormalised to sum to 1


def route(x_BTD: jax.Array, router_DE: jax.Array, top_k: int, *,
          jitter: float = 0.0, jitter_key: jax.Array | None = None) -> Routing:
    """Softmax router, top-k with renormalised weights.

    Jitter (Switch Transformer): the router input is multiplied by noise ~ U(1 - jitter, 1 + jitter).
    It applies only when `jitter > 0` and a `jitter_key` is given, so evaluation (no key) is
    deterministic and the jitted step stays pure: the caller splits the key from its train rng.
    """
    x_BTD = x_BTD.astype(jnp.float32)
    if jitter > 0 and jitter_key is not None:
        x_BTD = x_BTD * jax.random.uniform(jitter_key, x_BTD.shape, jnp.float32,
                                           1.0 - jitter, 1.0 + jitter)
    logits_BTE = jnp.einsum("btd,de->bte", x_BTD, router_DE.astype(jnp.float32))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    top_BTK, experts_BTK = jax.lax.top_k(probs_BTE, top_k)
    weights_BTK = top_BTK / jnp.sum(top_BTK, axis=-1, keepdims=True)
    return Routing(logits_BTE, probs_BTE, experts_BTK.astype(jnp.int32), weights_BTK)


def _masked_mean(v_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    return jnp.sum(v_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def expert_load(experts_BTK: jax.Array, mask_BT: jax.Array, num_experts: int) -> jax.Array:
    """f_E: fraction of real token copies (all K slots) routed to each expert; sums to 1."""
    onehot_BTKE = jax.nn.one_hot(experts_BTK, num_experts, dtype=jnp.float32)
    counts_E = jnp.einsum("btke,bt->e", onehot_BTKE, mask_BT)
    return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)


def mean_probs(probs_BTE: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """P_E: the router probability of each expert averaged over real tokens."""
    return jnp.einsum("bte,bt->e", probs_BTE, mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def load_balancing_loss(probs_BTE: jax.Array, experts_BTK: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Switch/Mixtral loss E * sum_e f_e P_e; equals 1 for perfectly uniform routing.

    Gradients flow through P_e only (f_e counts discrete choices).
    """
    num_experts = probs_BTE.shape[-1]
    f_E = expert_load(experts_BTK, mask_BT, num_experts)
    return num_experts * jnp.sum(f_E * mean_probs(probs_BTE, mask_BT))


def z_loss(logits_BTE: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2."""
    return _masked_mean(jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1)), mask_BT)


def router_entropy(probs_BTE: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean entropy (nats) of the router distribution over real tokens."""
    ent_BT = -jnp.sum(probs_BTE * jnp.log(jnp.maximum(probs_BTE, 1e-30)), axis=-1)
    return _masked_mean(ent_BT, mask_BT)
