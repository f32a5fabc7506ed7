"""Sampling against the full forward pass: greedy decoding through `sample_texts` (what
`python -m gqlm.sample` runs) is the argmax of the full forward over the sequence so far, at every
position; top-k sampling never leaves the top k, and draws from the tempered, truncated softmax.

The reference re-runs the plain model on one row per new token: no cache, no batching.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm.config import base_config
from gqlm.models import decode
from gqlm.models.transformer import Transformer
from gqlm.train import sampling
from gqlm.train import state as state_lib
from gqlm.train.experiment import build_experiment
from gqlm.train.tasks.lm import LMTask
from tests.helpers import smoke_config
PROMPTS = ["ROMEO:", "a", "To be, or not to be"]


WIDTH = 64  # every reference row is padded to this length: one compile for all of them


@jax.jit(static_argnums=0)
def _row_logits(graphdef, params, ids_W, length):
    """Logits [W, V] of one row holding one document in its first `length` slots (positions
    0..length-1), padding (segment 0) after it: causal, so the padding changes nothing before it."""
    positions_W = jnp.arange(ids_W.shape[0])
    segment_ids_W = (positions_W < length).astype(jnp.int32)
    logits_1WV, _ = nnx.merge(graphdef, params)(ids_W[None], positions_W[None], segment_ids_W[None])
    return logits_1WV[0]


def row_logits(graphdef, params, ids):
    """Full-forward logits [len(ids), V] of one row."""
    ids_W = np.zeros(WIDTH, np.int32)
    ids_W[:len(ids)] = ids
    return np.asarray(_row_logits(graphdef, params, jnp.asarray(ids_W), len(ids)))[:len(ids)]


def greedy_reference(graphdef, params, prompt_ids, num_tokens, vocab_size):
    """Greedy over the tokenizer's ids (not the embedding's padding past them)."""
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        ids.append(int(np.argmax(row_logits(graphdef, params, ids)[-1][:vocab_size])))
    return ids[len(prompt_ids):]


def test_greedy_sample_texts_is_the_full_forward_argmax_at_every_position(monkeypatch):
    exp = build_experiment(smoke_config(**{"model.init_std": 0.3}), LMTask())
    tok, num_tokens = exp.tokenizer, 12
    generated = []  # what sample_texts' generator returned, before decoding

    def spy(*args, **kwargs):
        generated.append(np.asarray(decode.generate(*args, **kwargs)))
        return generated[-1]
    monkeypatch.setattr(sampling, "generate", spy)
    with jax.set_mesh(exp.mesh):
        params = state_lib.init_state(exp.config.model, exp.tx, exp.config.seed, exp.shardings).params
        texts = sampling.sample_texts(exp, params, PROMPTS, num_tokens, temperature=0.0)
    params = jax.device_get(params)
    assert len(generated) == 1 and len(set(generated[0].ravel())) > 3  # not a degenerate model
    for prompt, text, got in zip(PROMPTS, texts, generated[0]):
        want = greedy_reference(exp.model.graphdef, params, [tok.bos_id] + tok.encode(prompt), num_tokens,
                                tok.vocab_size)
        end = want.index(tok.eos_id) + 1 if tok.eos_id in want else num_tokens
        np.testing.assert_array_equal(got[:end], want[:end])  # a row stops at EOS, then pads
        assert (got[end:] == tok.pad_id).all()
        assert text == tok.decode([i for i in want[:end] if i != tok.eos_id])


# ----------------------------------------------------------------------------- top-k

V, K = 256, 3


def small_model():
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    max_seq_len=64, init_std=0.3))
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))


def top_k_rank(logits_V, token):
    """Rank of `token` among the logits (0 = the largest); a token tied within float noise with
    the k-th largest counts as rank k - 1 (the cache and the full forward may round differently)."""
    kth = np.sort(logits_V)[-K]
    return K - 1 if abs(logits_V[token] - kth) < 1e-5 else int((logits_V > logits_V[token]).sum())


def test_top_k_generation_never_leaves_the_full_forward_top_k():
    graphdef, params = small_model()
    prompts = [[int(t) for t in np.random.default_rng(row).integers(0, V, 1 + row % 5)] for row in range(32)]
    num_tokens = 16
    tokens_BN = np.asarray(decode.generate(graphdef, params, prompts, jax.random.key(3), num_tokens=num_tokens,
                                           temperature=2.0, top_k=K))
    ranks = []
    for prompt, row in zip(prompts, tokens_BN):
        logits_TV = row_logits(graphdef, params, prompt + row.tolist())
        for i, token in enumerate(row):  # token i is predicted at position len(prompt) - 1 + i
            ranks.append(top_k_rank(logits_TV[len(prompt) - 1 + i], token))
    counts = np.bincount(ranks)
    assert len(counts) <= K, counts  # no token outside the top k, in 512 draws
    assert len(counts) == K and counts.min() > 20, counts  # and every one of the k is drawn


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_next_token_draws_from_the_tempered_top_k_softmax(temperature):
    logits_V = np.random.default_rng(0).normal(size=V).astype(np.float32) * 2.0
    n = 20_000
    draws = np.asarray(decode.next_token(jnp.broadcast_to(jnp.asarray(logits_V), (n, V)), jax.random.key(1),
                                         temperature, K))
    top = np.argsort(logits_V)[::-1][:K]
    assert set(np.unique(draws)) <= set(top.tolist())
    p = np.exp((logits_V[top] - logits_V[top].max()) / temperature)
    p /= p.sum()
    freq = np.array([(draws == t).mean() for t in top])
    # 5 standard errors: a fixed seed, so this is deterministic, but not fitted to the seed.
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(p * (1 - p) / n).max())
