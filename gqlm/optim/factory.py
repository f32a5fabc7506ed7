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
from gqlm.config.optimizer import MAIN_GROUP, validate, validate_group
from gqlm.optim.adalayer import path_str
from gqlm.optim.state_sharding import opt_state_shardings  # noqa: F401  (re-exported)
from gqlm.optim.zoo import BUILDERS

MAIN = MAIN_GROUP  # the label of parameters no group matches


def decay_mask(params: Any) -> Any:
    """True for parameters that decay: matrices and higher, never norms or biases."""
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def make_schedule(o: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then cosine / linear / constant decay to
    min_lr_ratio * learning_rate at total_steps."""
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


def _parse_groups(o: ConfigDict) -> list[dict]:
    """The groups of `optimizer.groups`, each checked (config/optimizer.py) and its pattern compiled."""
    groups = []
    for i, g in enumerate(o.groups):
        validate_group(g, f"optimizer.groups[{i}]")
        groups.append(dict(name=g["name"], pattern=re.compile(g["pattern"]), optimizer=g["optimizer"],
                           lr_multiplier=g.get("lr_multiplier", 1.0)))
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
    validate(o)  # also run by config.validate; repeated here for optimizers built outside an experiment
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
