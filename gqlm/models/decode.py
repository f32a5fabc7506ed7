"""Batched generation with a KV cache: one prefill over the prompts, then one token per row per step.

B batch, P prompt length (padded), N new tokens, S cache slots (P + N - 1), L layers, G kv heads,
K head dim, V vocab.

Prompts are left-aligned: row b holds its prompt in slots [0, len_b), padding after it, and slot
s of the cache holds the token at position s of its row, so positions never need an offset (the
same for RoPE, ALiBi and NoPE). The prefill runs all P slots at once (padding as segment 0: its
entries are garbage that the row's own new tokens overwrite before any query can see them); the
step at iteration i feeds row b's last token at position len_b + i - 1. A row that emits a stop
token keeps emitting `pad_id`, and the loop ends as soon as every row has stopped.

Per layer the cache holds keys [B, G, S, K] and values [B, G, K, S] (as the attention dots read
them: no per-step transposes), sharded like an activation: batch over the rules' `batch` axes, kv heads over
`kv_heads` (tensor). The prefill and the decode loop are separate jits; the loop (a
`lax.while_loop`) takes the cache donated and updates it in place.

Exact against the full forward for dense and dropless MoE models; `moe.dispatch=capacity` sizes
its buffers by the call's length, so tokens it would drop in a long sequence are kept one at a
time. Positions past the training length extrapolate, as they would in the full forward.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gqlm.config import DEFAULT_RULES
from gqlm.mesh import fit_spec, logical_to_spec

K_AXES = ("layers", "batch", "kv_heads", "length", "kv")  # logical names of k_LBGSK
V_AXES = ("layers", "batch", "kv_heads", "kv", "length")


class KVCache(NamedTuple):
    """A tuple of L arrays each (keys [B, G, S, K], values [B, G, K, S]), or with scan_layers
    one array each, stacked on axis 0."""
    k_LBGSK: Any
    v_LBGKS: Any


def next_token(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int,
               vocab_limit: int = 0) -> jax.Array:
    """Greedy when temperature == 0; else a sample from the (top-k truncated) tempered softmax.
    `vocab_limit` > 0: ids from it on (the embedding's padding past the tokenizer's vocabulary)
    are never picked."""
    if 0 < vocab_limit < logits_BV.shape[-1]:
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:  # a k of the whole vocabulary (or more) truncates nothing
        kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned int32 prompts_BP (padded with `pad_id` to the longest prompt, or to `length`
    so that callers can keep a few fixed shapes) and their lengths_B."""
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    if not len(prompts) or lengths_B.min() < 1:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if length is not None and length < lengths_B.max():
        raise ValueError(f"prompt length {length} is shorter than the longest prompt ({lengths_B.max()})")
    prompts_BP = np.full((len(prompts), length or lengths_B.max()), pad_id, np.int32)
    for b, p in enumerate(prompts):
        prompts_BP[b, :len(p)] = p
    return prompts_BP, lengths_B


def _constrain(cache: KVCache, rules: Sequence) -> KVCache:
    """Pins the cache's sharding to the current mesh (a no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cache

    def constrain(x, names):
        spec = fit_spec(logical_to_spec(names[-x.ndim:], rules, mesh), x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, spec)
    return KVCache(*(jax.tree.map(partial(constrain, names=names), part)
                     for part, names in zip(cache, (K_AXES, V_AXES))))


def _empty_cache(model: Any, batch: int, num_slots: int) -> KVCache:
    """Zeros, stacked over layers with `scan_layers`, else one array per layer (updated in place)."""
    attn = model.blocks.attn if model.scan_layers else model.blocks[0].attn
    G, K = attn.k.shape[-2:]
    k_BGSK = jnp.zeros((batch, G, num_slots, K), attn.compute_dtype)
    v_BGKS = jnp.zeros((batch, G, K, num_slots), attn.compute_dtype)
    if model.scan_layers:
        return KVCache(*(jnp.broadcast_to(x, (model.num_layers, *x.shape)) for x in (k_BGSK, v_BGKS)))
    return KVCache((k_BGSK,) * model.num_layers, (v_BGKS,) * model.num_layers)


@partial(jax.jit, static_argnames=("graphdef", "num_slots", "rules"))
def prefill(graphdef: nnx.GraphDef, params: Any, prompts_BP: jax.Array, lengths_B: jax.Array, *,
            num_slots: int, rules: Sequence = DEFAULT_RULES) -> tuple[KVCache, jax.Array]:
    """(cache holding the prompts, logits_BV at each row's last prompt token)."""
    model = nnx.merge(graphdef, params)
    B, P = prompts_BP.shape
    cache = _constrain(_empty_cache(model, B, num_slots), rules)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], (B, P))
    segment_ids_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)
    logits_BPV, k_LBGSK, v_LBGKS = model.cached(prompts_BP, positions_BP, segment_ids_BP, *cache, rules=rules)
    last_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return _constrain(KVCache(k_LBGSK, v_LBGKS), rules), last_BV


@partial(jax.jit, donate_argnames=("cache",),
         static_argnames=("graphdef", "num_tokens", "temperature", "top_k", "stop_ids", "pad_id", "rules",
                          "vocab_limit"))
def decode(graphdef: nnx.GraphDef, params: Any, cache: KVCache, logits_BV: jax.Array, lengths_B: jax.Array,
           rng: jax.Array, *, num_tokens: int, temperature: float, top_k: int, stop_ids: tuple[int, ...],
           pad_id: int, rules: Sequence = DEFAULT_RULES, vocab_limit: int = 0) -> tuple[jax.Array, KVCache]:
    """(tokens_BN that follow the prefill's logits, the updated cache)."""
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)  # -1 matches no token

    def pick(logits_BV, rng, done_B):
        rng, key = jax.random.split(rng)
        token_B = next_token(logits_BV, key, temperature, top_k, vocab_limit).astype(jnp.int32)
        token_B = jnp.where(done_B, pad_id, token_B)
        return token_B, done_B | jnp.isin(token_B, stops), rng

    def step(carry):
        i, params, cache, token_B, done_B, out_BN, rng = carry
        positions_B1 = (lengths_B + i - 1)[:, None]
        # params ride in the carry: nnx.scan (scan_layers) refuses modules from an outer trace
        model = nnx.merge(graphdef, params)
        logits_B1V, k_LBGSK, v_LBGKS = model.cached(token_B[:, None], positions_B1, jnp.ones_like(positions_B1),
                                                    *cache, rules=rules)
        token_B, done_B, rng = pick(logits_B1V[:, 0], rng, done_B)
        cache = _constrain(KVCache(k_LBGSK, v_LBGKS), rules)
        return i + 1, params, cache, token_B, done_B, out_BN.at[:, i].set(token_B), rng

    def running(carry):
        return (carry[0] < num_tokens) & ~jnp.all(carry[4])

    token_B, done_B, rng = pick(logits_BV, rng, jnp.zeros(lengths_B.shape, bool))
    out_BN = jnp.full((lengths_B.shape[0], num_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
    carry = (1, params, cache, token_B, done_B, out_BN, rng)
    _, _, cache, _, _, out_BN, _ = jax.lax.while_loop(running, step, carry)
    return out_BN, cache


def generate(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
             num_tokens: int, temperature: float = 0.0, top_k: int = 0, stop_ids: Sequence[int] = (),
             pad_id: int = 0, rules: Sequence = DEFAULT_RULES, prompt_len: int | None = None,
             vocab_limit: int = 0) -> jax.Array:
    """int32 tokens_BN continuing each prompt (lists of ids, any lengths >= 1).

    A row that emits one of `stop_ids` keeps that token, then `pad_id` to the end. Run it under
    `jax.set_mesh(mesh)` with params on that mesh to shard the cache. `prompt_len` pads the
    prompts to that length (default: the longest), so batches of other lengths reuse one compile.
    `vocab_limit` (the tokenizer's vocabulary size; 0: no limit) keeps the ids of the embedding's
    padding rows out of the output.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1")
    prompts_BP, lengths_B = pad_prompts(prompts, pad_id, prompt_len)
    rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules)  # hashable
    cache, logits_BV = prefill(graphdef, params, prompts_BP, lengths_B, rules=rules,
                               num_slots=prompts_BP.shape[1] + num_tokens - 1)
    tokens_BN, _ = decode(graphdef, params, cache, logits_BV, lengths_B, rng, num_tokens=num_tokens,
                          temperature=float(temperature), top_k=int(top_k), stop_ids=tuple(int(s) for s in stop_ids),
                          pad_id=int(pad_id), rules=rules, vocab_limit=int(vocab_limit))
    return tokens_BN
