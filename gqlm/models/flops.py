"""Parameter counts and training FLOPs per token, from the abstract model (nothing allocated).

Conventions (used by MFU accounting and scaling-law fits):
- embedding parameters: those with a 'vocab' logical axis (the token table, and the output head
  when untied). The head's compute is counted separately, as 6 D V.
- expert weights: parameters whose first logical axis (after 'layers') is 'expert'; a token uses
  only top_k of num_experts of them. A router ('embed', 'expert') is fully active.
"""

from __future__ import annotations

import math

from flax import nnx

from gqlm.config import ConfigDict
from gqlm.models.attention import head_dims
from gqlm.models.transformer import Transformer


def _param_names_and_sizes(cfg: ConfigDict) -> list[tuple[tuple[str, ...], int]]:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    rows = []
    for _, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = tuple(variable.get_metadata().get("out_sharding") or ())
        rows.append((names, math.prod(variable.get_value().shape)))
    return rows


def count_params(cfg: ConfigDict) -> dict[str, int]:
    """{total, embedding, non_embedding, active_non_embedding} parameter counts of `config.model`."""
    total = embedding = inactive = 0
    active_fraction = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe.num_experts else 1.0
    for names, size in _param_names_and_sizes(cfg):
        total += size
        if "vocab" in names:
            embedding += size
            continue
        leading = [n for n in names if n != "layers"][:1]
        if leading == ["expert"]:
            inactive += size - round(size * active_fraction)
    non_embedding = total - embedding
    return {"total": total, "embedding": embedding, "non_embedding": non_embedding,
            "active_non_embedding": non_embedding - inactive}


def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward):

        6 * N + 6 * L * T * D_attn + 6 * D * V

    N = active non-embedding parameters (2 FLOPs per multiply-add, x3 for forward + backward);
    L layers, T = seq_len, D_attn = num_heads * head_dim: the attention scores q k^T and the
    weighted sum p v cost 2 * 2 * T * D_attn FLOPs per token per layer forward, 12 L T D_attn for
    training, halved to 6 L T D_attn because a causal token attends on average to T / 2 keys
    (as in Kaplan et al. 2020); D = embed_dim, V = vocab_size: the output head.
    """
    H, _, K = head_dims(cfg)
    n_active = count_params(cfg)["active_non_embedding"]
    return float(6 * n_active + 6 * cfg.num_layers * seq_len * H * K + 6 * cfg.embed_dim * cfg.vocab_size)
