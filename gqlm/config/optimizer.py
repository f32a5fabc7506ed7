"""The `optimizer` section and its checks (gqlm/optim/factory.py builds the transform)."""

from __future__ import annotations

import re

import ml_collections

from gqlm.config.errors import ConfigError, check, check_choice

OPTIMIZERS = ("adamw", "lion", "signum", "adafactor", "sgd", "adalayer", "soap")  # optim/zoo.py BUILDERS
SCHEDULES = ("cosine", "linear", "constant")  # optim/factory.py make_schedule
MAIN_GROUP = "__main__"  # optim/factory.py's label of the parameters no group matches (reserved)


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adamw",  # OPTIMIZERS
        learning_rate=3e-3,
        schedule="cosine",  # SCHEDULES
        warmup_steps=100,
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,  # global-norm clip; 0 disables
        precondition_frequency=10,
        max_precond_dim=10_000,
        max_precond_block=0,  # soap: > 0 cuts longer dims into blocks of this size, each block its own SOAP (0: off)
        shampoo_beta=-1.0,
        merge_dims=False,
        precondition_1d=False,
        normalize_grads=False,
        adalayer_head_pattern=r"(^|/)unembed(/|$)",  # adalayer: the untied output head (one v per output row)
        # Parameter groups: tuple of dicts {name, pattern (regex on the '/'-joined param path),
        # optimizer (name), lr_multiplier}; parameters matching no group use the main optimizer.
        groups=(),
    ))


def validate(o: ml_collections.ConfigDict) -> None:
    check_choice("optimizer.name", o.name, OPTIMIZERS)
    check_choice("optimizer.schedule", o.schedule, SCHEDULES)
    check(0 < o.learning_rate < float("inf"), f"optimizer.learning_rate={o.learning_rate} must be positive and finite")
    # Adam-like members divide by sqrt(v) + eps: with eps <= 0 a parameter whose gradient is 0 (an
    # untied embedding row never seen) gets 0/0 = NaN from a finite gradient, which the step applies.
    check(o.eps > 0, f"optimizer.eps={o.eps} must be positive")
    for key in ("b1", "b2"):
        check(0 <= o[key] < 1, f"optimizer.{key}={o[key]} must lie in [0, 1)")
    check(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    check(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    check(o.shampoo_beta < 1, f"optimizer.shampoo_beta={o.shampoo_beta} must be < 1 (negative = b2)")
    check(o.precondition_frequency >= 1, f"optimizer.precondition_frequency={o.precondition_frequency} must be >= 1")
    check(o.max_precond_dim >= 1, f"optimizer.max_precond_dim={o.max_precond_dim} must be >= 1")
    check(o.max_precond_block >= 0,
          f"optimizer.max_precond_block={o.max_precond_block} must be >= 0 (0 = no blocks)")
    check(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    check(o.grad_clip >= 0, f"optimizer.grad_clip={o.grad_clip} must be >= 0 (0 disables)")
    compile_regex("optimizer.adalayer_head_pattern", o.adalayer_head_pattern)
    for i, group in enumerate(o.groups):
        validate_group(group, f"optimizer.groups[{i}]")
    names = [g["name"] for g in o.groups]
    for name in set(names):
        check(names.count(name) == 1, f"optimizer.groups name {name!r} is used twice")


def validate_group(g: dict, where: str) -> None:
    """One parameter group: {name, pattern, optimizer[, lr_multiplier]}."""
    missing = [k for k in ("name", "pattern", "optimizer") if k not in g]
    check(not missing, f"{where} lacks key(s) {', '.join(missing)}")
    check(g["name"] != MAIN_GROUP, f"{where}.name={g['name']!r} is reserved")
    check_choice(f"{where}.optimizer", g["optimizer"], OPTIMIZERS)
    mult = g.get("lr_multiplier", 1.0)
    check(mult > 0, f"{where}.lr_multiplier={mult} must be positive")
    compile_regex(f"{where}.pattern", g["pattern"])


def compile_regex(key: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}={pattern!r} is not a regex: {e}") from None
