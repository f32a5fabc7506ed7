"""GQ-VAE loss and metrics.

Shapes: B batch, T positions, M max token length, V = 256 byte values, C codebook size, D embed.

loss = sum_{t,k} m_{t,k} CE(byte k ...) / sum_{t,k} m_{t,k}      (masked mean reconstruction)
     + gate_w * mean(g)                                              (compression pressure)
     [+ target_w * (mean(g) - 1 / target_len)^2                       (token rate; not the paper's)]
     + sum_t sg(g_t) mean_k BCE(length logit_{t,k}, m_{t,k})         (which bytes are in the token)
     + commit_w * ||z - sg(e)||^2 + codebook_w * ||e - sg(z)||^2     (VQ)
all averaged over valid byte positions. Byte k of the window ending at t is position t-(M-1-k).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gqlm.config import ConfigDict
from gqlm.tokenizers.gqvae.model import NUM_BYTES, GQVAE, forward, hard_boundaries
from gqlm.tokenizers.gqvae.quantizer import code_counts

PRETOKEN_SPAN = (3, 10)  # pieces of these lengths (bytes) are the ones a healthy gate cuts inside
SATURATED_LOGIT = 9.0


def windows(x_BT: jnp.ndarray, m: int, fill: Any) -> jnp.ndarray:
    """[B, T, M]: out[b, t, k] = x[b, t - (M-1-k)], or `fill` before the start."""
    t = x_BT.shape[1]
    pad_BT = jnp.pad(x_BT, ((0, 0), (m - 1, 0)), constant_values=fill)
    return jnp.stack([pad_BT[:, k:k + t] for k in range(m)], axis=-1)


def soft_mask(g_BT: jnp.ndarray, m: int) -> jnp.ndarray:
    """m_{t,k} = prod_{i=1}^{M-1-k} (1 - g_{t-i}), with g = 1 before the start (a token ended
    there). The probability that byte k of the window ending at t belongs to the token ending at t."""
    keep_BTM = windows(1.0 - g_BT, m, 0.0)  # keep[..., j] = 1 - g_{t-(M-1-j)}
    # m_k = prod_{j=k}^{M-2} keep_j: a reverse cumulative product, with an empty product at k=M-1.
    tail_BTM = jnp.concatenate([keep_BTM[..., :-1], jnp.ones_like(keep_BTM[..., :1])], axis=-1)
    return jnp.flip(jnp.cumprod(jnp.flip(tail_BTM, -1), axis=-1), -1)


def gqvae_loss(model: GQVAE, batch: dict[str, jnp.ndarray], quantize: Any,
               cfg: ConfigDict) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(scalar loss, metrics). `batch` = {'bytes': [B, T] int32, 'lengths': [B] int32}."""
    out = forward(model, batch["bytes"], batch["lengths"], quantize, cfg.fixed_gate_every, cfg.gate, cfg.gate_bound)
    return loss_terms(out, batch, quantize, cfg)


def loss_terms(out: dict[str, jnp.ndarray], batch: dict[str, jnp.ndarray], quantize: Any,
               cfg: ConfigDict, gate_weight: Any = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(scalar loss, metrics) of a `forward` output `out`; metrics include `code_counts` [C].
    `gate_weight`: the compression weight at this step (default `cfg.gate_loss_weight`)."""
    gate_weight = cfg.gate_loss_weight if gate_weight is None else gate_weight
    m = cfg.max_token_len
    valid_BT = out["valid"].astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid_BT), 1.0)
    g_BT = out["gates"]
    mask_BTM = soft_mask(g_BT, m) * valid_BT[..., None]
    targets_BTM = jnp.minimum(windows(batch["bytes"], m, 0), NUM_BYTES - 1)

    ce_BTM = optax.softmax_cross_entropy_with_integer_labels(out["byte_logits"], targets_BTM)
    recon = jnp.sum(mask_BTM * ce_BTM) / jnp.maximum(jnp.sum(mask_BTM), 1.0)
    gate = jnp.sum(g_BT * valid_BT) / n_valid
    bce_BTM = optax.sigmoid_binary_cross_entropy(out["len_logits"], mask_BTM)
    length = jnp.sum(jax.lax.stop_gradient(g_BT) * valid_BT * jnp.mean(bce_BTM, -1)) / n_valid
    z_BTD, e_BTD = out["z"], out["e"]
    commit = jnp.sum(jnp.sum(jnp.square(z_BTD - jax.lax.stop_gradient(e_BTD)), -1) * valid_BT) / n_valid
    codebook = jnp.sum(jnp.sum(jnp.square(e_BTD - jax.lax.stop_gradient(z_BTD)), -1) * valid_BT) / n_valid
    # Warm-up: no commitment pull towards still-random codes; the codes already track z.
    loss = (recon + gate_weight * gate + length
            + jnp.where(quantize, cfg.commit_weight, 0.0) * commit + cfg.codebook_weight * codebook)
    if cfg.gate_target_len:  # the token rate held near 1 / target length (off in the paper's objective)
        loss = loss + cfg.gate_target_weight * jnp.square(gate - 1.0 / cfg.gate_target_len)

    counts_C = code_counts(out["codes"], out["valid"], cfg.codebook_size)
    metrics = dict(loss=loss, recon=recon, gate_loss=gate, length_loss=length, commit=commit,
                   codebook_loss=codebook, code_counts=counts_C,
                   **segmentation_metrics(out, batch, m))
    p_C = counts_C / n_valid
    metrics["codebook_usage"] = jnp.mean((counts_C > 0).astype(jnp.float32))
    metrics["codebook_perplexity"] = jnp.exp(-jnp.sum(jnp.where(p_C > 0, p_C * jnp.log(p_C), 0.0)))
    return loss, metrics


def segmentation_metrics(out: dict[str, jnp.ndarray], batch: dict[str, jnp.ndarray],
                         m: int) -> dict[str, jnp.ndarray]:
    """Byte accuracy of the hard tokens (gate > 0.5), mean gate, mean token length in bytes, and
    the collapse monitor's (collapse.py) cut statistics."""
    valid_BT = out["valid"].astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid_BT), 1.0)
    ends_BT = hard_boundaries(out["gates"], batch["lengths"], m)
    cuts = cut_metrics(ends_BT, out["gates"], out["gate_logits"], batch["lengths"])
    ends_BT = ends_BT.astype(jnp.float32)
    hard_BTM = soft_mask(ends_BT, m) * ends_BT[..., None]
    targets_BTM = windows(batch["bytes"], m, 0)
    correct_BTM = (jnp.argmax(out["byte_logits"], -1) == targets_BTM).astype(jnp.float32)
    return dict(byte_accuracy=jnp.sum(hard_BTM * correct_BTM) / jnp.maximum(jnp.sum(hard_BTM), 1.0),
                mean_gate=jnp.sum(out["gates"] * valid_BT) / n_valid,
                mean_token_len=n_valid / jnp.maximum(jnp.sum(ends_BT), 1.0), **cuts)


def cut_metrics(ends_BT: jnp.ndarray, g_BT: jnp.ndarray, logits_BT: jnp.ndarray,
                lengths_B: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Where tokens end: `forced_cut_share` of the token ends not decided by the gate (a piece's
    last byte, the `max_token_len` cap); `pretoken_cut_share` of the 3-10-byte pieces the gate
    cuts inside (0 when a batch has none); `saturated_gates`, the share of inner positions whose
    logit is past +-SATURATED_LOGIT (where the paper's sigmoid has a slope < 1.3e-4)."""
    inner_BT = jnp.arange(g_BT.shape[1])[None, :] < lengths_B[:, None] - 1
    gate_cuts_BT = ends_BT & inner_BT & (g_BT > 0.5)
    mid_B = (lengths_B >= PRETOKEN_SPAN[0]) & (lengths_B <= PRETOKEN_SPAN[1])
    cut_inside_B = jnp.any(gate_cuts_BT, axis=1) & mid_B
    saturated_BT = inner_BT & (jnp.abs(logits_BT) > SATURATED_LOGIT)
    count = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731
    return dict(forced_cut_share=1.0 - count(gate_cuts_BT) / jnp.maximum(count(ends_BT), 1.0),
                pretoken_cut_share=count(cut_inside_B) / jnp.maximum(count(mid_B), 1.0),
                saturated_gates=count(saturated_BT) / jnp.maximum(count(inner_BT), 1.0))
