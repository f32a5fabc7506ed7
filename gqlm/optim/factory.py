"""The optimizer the runner uses, built from `config.optimizer`.

    clip_by_global_norm(grad_clip)                      (if grad_clip > 0)
    -> per group: optimizer -> masked decoupled weight decay -> lr schedule x lr_multiplier

Weight decay touches only parameters with ndim >= 2 (norm scales and biases are excluded).
Groups (`optimizer.groups`) pick parameters by `re.search` on the '/'-joined path and run
through `optax.multi_transform`; parameters no group matches use the main optimizer.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from gqlm.config import ConfigDict, ConfigError
from gqlm.optim.adalayer import path_str
from gqlm.optim.state_sharding import opt_state_shardings  # noqa: F401  (re-exported)
from gqlm.optim.zoo import BUILDERS

MAIN = "__main__"
SCHEDULES = ("cosine", "linear", "constant")


def decay_mask(params: Any) -> Any:
    """True for parameters that decay: matrices and higher, never norms or biases."""
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def make_schedule(o: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then cosine / linear / constant decay to
    min_lr_ratio * learning_rate at total_steps."""
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={o.schedule!r} must be one of {', '.join(SCHEDULES)}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    if o.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    lr, warmup = o.learning_rate, o.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=o.min_lr_ratio),
        "linear": lambda: optax.linear_schedule(lr, lr * o.min_lr_ratio, decay_steps),
        "constant": lambda: optax.constant_schedule(lr),
    }[o.schedule]()
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _check_hyperparameters(o: ConfigDict) -> None:
    if o.name not in BUILDERS:
        raise ConfigError(f"optimizer.name={o.name!r} is not one of {', '.join(BUILDERS)}")
    if not o.learning_rate > 0:
        raise ConfigError(f"optimizer.learning_rate={o.learning_rate} must be positive")
    for key in ("b1", "b2"):
        if not 0 <= o[key] < 1:
            raise ConfigError(f"optimizer.{key}={o[key]} must lie in [0, 1)")
    if o.shampoo_beta >= 1:
        raise ConfigError(f"optimizer.shampoo_beta={o.shampoo_beta} must be < 1 (negative = b2)")
    if o.precondition_frequency < 1:
        raise ConfigError(f"optimizer.precondition_frequency={o.precondition_frequency} must be >= 1")
    if o.max_precond_dim < 1:
        raise ConfigError(f"optimizer.max_precond_dim={o.max_precond_dim} must be >= 1")
    if o.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if o.grad_clip < 0:
        raise ConfigError(f"optimizer.grad_clip={o.grad_clip} must be >= 0 (0 disables)")
    try:
        re.compile(o.adalayer_head_pattern)
    except re.error as e:
        raise ConfigError(f"optimizer.adalayer_head_pattern={o.adalayer_head_pattern!r}: {e}") from None


def _parse_groups(o: ConfigDict) -> list[dict]:
    groups, names = [], set()
    for i, g in enumerate(o.groups):
        where = f"optimizer.groups[{i}]"
        missing = [k for k in ("name", "pattern", "optimizer") if k not in g]
        if missing:
            raise ConfigError(f"{where} lacks key(s) {', '.join(missing)}")
        name, mult = g["name"], g.get("lr_multiplier", 1.0)
        if name in names or name == MAIN:
            raise ConfigError(f"{where}.name={name!r} is used twice or reserved")
        names.add(name)
        if g["optimizer"] not in BUILDERS:
            raise ConfigError(f"{where}.optimizer={g['optimizer']!r} is not one of {', '.join(BUILDERS)}")
        if not mult > 0:
            raise ConfigError(f"{where}.lr_multiplier={mult} must be positive")
        try:
            pattern = re.compile(g["pattern"])
        except re.error as e:
            raise ConfigError(f"{where}.pattern={g['pattern']!r} is not a regex: {e}") from None
        groups.append(dict(name=name, pattern=pattern, optimizer=g["optimizer"], lr_multiplier=mult))
    return groups


def param_labels(groups: list[dict], params: Any) -> Any:
    """Tree of group names (MAIN where no group matches); errors on zero or double matches."""
    hits = {g["name"]: 0 for g in groups}

    def label(path, _):
        p = path_str(path)
        matched = [g["name"] for g in groups if g["pattern"].search(p)]
        if len(matched) > 1:
            raise ConfigError(f"parameter {p} matches optimizer.groups {matched[0]!r} and {matched[1]!r}")
        for name in matched:
            hits[name] += 1
        return matched[0] if matched else MAIN

    labels = jax.tree_util.tree_map_with_path(label, params)
    for name, n in hits.items():
        if n == 0:
            raise ConfigError(f"optimizer.groups {name!r} pattern matches no parameter")
    return labels


def make_optimizer(opt_cfg: ConfigDict, total_steps: int,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transform, main learning-rate schedule) for a pure-dict params tree (arrays or shapes)."""
    o = opt_cfg
    _check_hyperparameters(o)
    schedule = make_schedule(o, total_steps)
    groups = _parse_groups(o)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if not groups:
        parts.append(BUILDERS[o.name](schedule, o, decay_mask))
    else:
        labels = param_labels(groups, params)
        transforms = {MAIN: BUILDERS[o.name](schedule, o, decay_mask)}
        for g in groups:
            scaled = lambda step, m=g["lr_multiplier"]: m * schedule(step)  # noqa: E731
            transforms[g["name"]] = BUILDERS[g["optimizer"]](scaled, o, decay_mask)
        parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts), schedule
