"""Text in, text out: prompts are encoded (BOS prepended, as in training), continued in one batch
by the KV-cache generator (models/decode.py), and each row decoded up to its EOS.

A prompt keeps its last min(data.seq_len, model.max_seq_len) tokens; the continuation then runs
past that length (no sliding window), with the positions the model extrapolates to.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from gqlm.models.decode import generate


def sample_texts(exp, params: Any, prompts: Sequence[str], num_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0) -> list[str]:
    """Decoded continuations of `prompts`, generated together; a row stops at EOS."""
    tok = exp.tokenizer
    window = min(exp.config.data.seq_len, exp.config.model.max_seq_len)
    ids = [([tok.bos_id] + tok.encode(p))[-window:] for p in prompts]
    tokens_BN = generate(exp.model.graphdef, params, ids, jax.random.PRNGKey(seed), num_tokens=num_tokens,
                         temperature=temperature, top_k=top_k, stop_ids=(tok.eos_id,), pad_id=tok.pad_id,
                         rules=exp.config.mesh.rules, vocab_limit=tok.vocab_size)
    texts = []
    for row in np.asarray(jax.device_get(tokens_BN)).tolist():
        row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
        texts.append(tok.decode(row))
    return texts


def sample_text(exp, params: Any, prompt: str, num_tokens: int, **kwargs) -> str:
    """Decoded continuation of one prompt (keywords as `sample_texts`)."""
    return sample_texts(exp, params, [prompt], num_tokens, **kwargs)[0]
