"""Autoregressive sampling from a trained model: greedy, temperature and top-k. B batch, T length, V vocab.

No KV cache: each new token re-runs the model over a sliding window of the last `window` tokens.
That is quadratic but exact, and plenty for the short samples a research loop prints.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def next_token(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy when temperature == 0; else a sample from the (top-k truncated) tempered softmax."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1)


@partial(jax.jit, static_argnames=("graphdef", "num_tokens", "window", "temperature", "top_k"))
def generate(graphdef: nnx.GraphDef, params: Any, prompt_P: jax.Array, rng: jax.Array, *,
             num_tokens: int, window: int, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Returns the `num_tokens` ids that follow `prompt_P` (a non-empty 1-D int32 array)."""
    model = nnx.merge(graphdef, params)
    prompt_len = prompt_P.shape[0]
    # `window` pad slots on each side keep the sliding window inside the buffer (no index clamping).
    buffer_N = jnp.zeros((2 * window + prompt_len + num_tokens,), jnp.int32).at[window:window + prompt_len].set(prompt_P)
    positions_1T = jnp.arange(window, dtype=jnp.int32)[None]

    def body(i, carry):
        buffer_N, rng = carry
        end = window + prompt_len + i  # index of the token being produced
        start = jnp.maximum(end - window, window)  # first real token in the window
        tokens_1T = jax.lax.dynamic_slice(buffer_N, (start,), (window,))[None]
        segment_ids_1T = jnp.ones_like(tokens_1T)
        logits_1TV, _ = model(tokens_1T, positions_1T, segment_ids_1T)
        logits_1V = jax.lax.dynamic_index_in_dim(logits_1TV, end - start - 1, axis=1, keepdims=False)
        rng, key = jax.random.split(rng)
        token = next_token(logits_1V, key, temperature, top_k)[0].astype(jnp.int32)
        return buffer_N.at[end].set(token), rng

    buffer_N, _ = jax.lax.fori_loop(0, num_tokens, body, (buffer_N, rng))
    return buffer_N[window + prompt_len:window + prompt_len + num_tokens]


def sample_text(exp, params: Any, prompt: str, num_tokens: int, *, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0) -> str:
    """Decoded continuation of `prompt` (BOS is prepended, as in training)."""
    tok = exp.tokenizer
    prompt_ids = jnp.asarray([tok.bos_id] + tok.encode(prompt), jnp.int32)
    window = min(exp.config.data.seq_len, exp.config.model.max_seq_len)
    prompt_ids = prompt_ids[-window:]
    ids = generate(exp.model.graphdef, params, prompt_ids, jax.random.PRNGKey(seed), num_tokens=num_tokens,
                   window=window, temperature=temperature, top_k=top_k)
    ids = [int(i) for i in jax.device_get(ids)]
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    return tok.decode([i for i in ids if i < tok.vocab_size])
