"""The `mesh` section: axis sizes and the logical-axis rules table."""

from __future__ import annotations

import math
from typing import Any, Sequence

import ml_collections

from gqlm.config.errors import ConfigError, check

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes. Changing parallelism is an edit of this table (or the mesh sizes).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        data=-1,  # -1: all remaining devices
        fsdp=1,
        tensor=1,
        expert=1,
        rules=DEFAULT_RULES,
    ))


def check_rules(rules: Sequence[Any]) -> None:
    """Each rule is (logical name, None | mesh axis | tuple of mesh axes), naming only MESH_AXES."""
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        check(ok, f"mesh.rules entry {rule!r} must be (logical_name, mesh axes)")
        target = rule[1]
        axes = tuple(target) if isinstance(target, (tuple, list)) else (() if target is None else (target,))
        for axis in axes:
            check(axis in MESH_AXES, f"mesh.rules maps {rule[0]!r} to unknown mesh axis {axis!r} "
                                     f"(known: {', '.join(MESH_AXES)})")


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, tensor, expert); one -1 takes the remaining devices."""
    sizes = {a: int(mesh[a]) for a in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh sizes {sizes} leave no whole size for mesh.{fill[0]}: {num_devices} devices")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh sizes data*fsdp*tensor*expert = {math.prod(sizes.values())} "
            f"but there are {num_devices} devices")
    return sizes
