"""The `gqvae` section: the GQ-VAE tokenizer model (gqlm/tokenizers/gqvae) and its training."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from gqlm.config.errors import ConfigError, check, check_positive

GATES = ("paper", "bounded", "straight_through")  # gqvae.gate (tokenizers/gqvae/gate.py)


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        train_tokenizer=False,  # True: `python -m gqlm.train` trains this GQ-VAE, not an LM (train/tasks)
        # The model: encoder and gater transformers (D, heads, layers, MLP width) and the codebook.
        embed_dim=128, num_heads=4, encoder_layers=2, gater_layers=2, mlp_dim=512, codebook_size=1024,
        max_token_len=10,  # K: the longest token, in bytes
        max_pretoken_len=16,  # pretokens are cut into pieces of at most this many bytes
        warmup_steps=500,  # steps without quantization
        reseed_every=250,  # dead codes re-seeded from recent encoder outputs; 0 disables
        codebook_lr_multiplier=10.0,
        # Loss weights: compression pressure on the gate, commitment (z to e), codebook (e to z).
        gate_loss_weight=3.0, commit_weight=1.0, codebook_weight=0.25,
        # The gate's parametrisation (docs/gqvae.md): "paper" sigmoid(logit); "bounded" logits
        # clipped to +-gate_bound with a gradient that never vanishes; "straight_through" hard 0/1.
        gate="paper", gate_bound=4.0,
        gate_weight_ramp_steps=0,  # > 0: gate_loss_weight is 0 in warm-up, then grows linearly over these steps
        # > 0: + gate_target_weight * (mean gate - 1 / gate_target_len)^2 holds the token rate (bytes)
        gate_target_len=0.0, gate_target_weight=100.0,
        fixed_gate_every=0,  # h > 0: VQ-VAE baseline with a token end every h bytes; 0 = learned
        learning_rate=1e-3,
        batch_size=256,  # pretokens per step
    ))


def validate(q: ml_collections.ConfigDict) -> None:
    check_positive(q, "gqvae", ("embed_dim", "num_heads", "encoder_layers", "gater_layers", "mlp_dim",
                                "codebook_size", "max_token_len", "max_pretoken_len", "batch_size"))
    check(q.embed_dim % q.num_heads == 0, f"gqvae.num_heads={q.num_heads} does not divide gqvae.embed_dim={q.embed_dim}")
    check_positive(q, "gqvae", ("warmup_steps", "reseed_every", "fixed_gate_every", "gate_loss_weight",
                                "commit_weight", "codebook_weight", "gate_weight_ramp_steps", "gate_target_len",
                                "gate_target_weight"), strict=False)
    check_positive(q, "gqvae", ("codebook_lr_multiplier", "learning_rate", "gate_bound"))
    check(q.gate in GATES, f"gqvae.gate={q.gate!r} is not one of {', '.join(GATES)}")
    check(q.fixed_gate_every <= q.max_token_len,
          f"gqvae.fixed_gate_every={q.fixed_gate_every} exceeds gqvae.max_token_len={q.max_token_len}")
    for key, value in q.items():  # an infinite weight or rate makes every loss inf/NaN from step 1
        check(not isinstance(value, float) or math.isfinite(value), f"gqvae.{key}={value} must be finite")
    # The term pulls mean(g) <= 1 towards 1 / gate_target_len: below 1 byte the target is unreachable.
    check(q.gate_target_len == 0 or q.gate_target_len >= 1,
          f"gqvae.gate_target_len={q.gate_target_len} must be 0 (off) or at least 1 (bytes per token)")


def from_dict(values: dict[str, Any], where: str) -> ml_collections.ConfigDict:
    """A validated `gqvae` section: the defaults overridden by `values` (a saved tokenizer's or
    checkpoint's); an unknown key or a bad value is a ConfigError naming `where`."""
    q = defaults()
    if not isinstance(values, dict):
        raise ConfigError(f"{where!r}: the gqvae config section is a {type(values).__name__}, not a mapping")
    for key, value in values.items():
        if key not in q:
            raise ConfigError(f"{where!r}: unknown gqvae config key {key!r}")
        q[key] = _typed(key, value, type(q[key]), where)
    try:
        validate(q)
    except ConfigError as e:
        raise ConfigError(f"{where!r}: {e}") from None
    return q


def _typed(key: str, value: Any, kind: type, where: str) -> Any:
    """`value` as the default's type, when that loses nothing: bool("no") is True and int(3.7) is
    3, so a hand-edited or foreign value must not be coerced into another model silently."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = isinstance(value, kind) if kind in (bool, str) else number and (kind is float or float(value).is_integer())
    if not ok:
        raise ConfigError(f"{where!r}: gqvae.{key}={value!r} is not a {kind.__name__}")
    return kind(value)
