"""Adalayer (Zhao et al., 2024, "Deconstructing What Makes a Good Optimizer for Language Models").

Adam whose second moment is shared: one scalar per parameter tensor (the mean of g^2 over the
tensor), except for the output head, where each output row (each vocabulary entry, the LAST axis
of a Flax `[embed, vocab]` kernel) keeps its own scalar. The head is found by a regex on the
'/'-joined parameter path. Moments are bias-corrected as in Adam; eps is added after the sqrt.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByAdalayerState(NamedTuple):
    count: jax.Array
    mu: Any  # param shapes
    nu: Any  # all-ones shapes (one scalar per tensor), or [1, ..., 1, rows] for the head


def path_str(path: tuple) -> str:
    """'/'-joined key path, e.g. 'blocks/0/attn/q': what head_pattern and optimizer.groups match."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def second_moment_shape(shape: tuple[int, ...], is_head: bool) -> tuple[int, ...]:
    if is_head and shape:
        return (1,) * (len(shape) - 1) + (shape[-1],)
    return (1,) * len(shape)


def block_mean_square(g: jax.Array, nu_shape: tuple[int, ...]) -> jax.Array:
    """Mean of g^2 over every axis the second moment does not keep."""
    axes = tuple(i for i, n in enumerate(nu_shape) if n == 1)
    return jnp.mean(jnp.square(g), axis=axes, keepdims=True)


def scale_by_adalayer(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                      head_pattern: str = r"(^|/)unembed(/|$)") -> optax.GradientTransformation:
    head = re.compile(head_pattern)

    def init(params):
        def nu0(path, p):
            return jnp.zeros(second_moment_shape(p.shape, bool(head.search(path_str(path)))), jnp.float32)
        return ScaleByAdalayerState(count=jnp.zeros([], jnp.int32),
                                    mu=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                                    nu=jax.tree_util.tree_map_with_path(nu0, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * block_mean_square(g.astype(jnp.float32), v.shape),
                          state.nu, updates)

        def direction(m, v, g):
            return ((m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)).astype(g.dtype)
        return jax.tree.map(direction, mu, nu, updates), ScaleByAdalayerState(count, mu, nu)

    return optax.GradientTransformation(init, update)
