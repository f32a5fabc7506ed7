"""ConfigError and the one-line checks every config section uses."""

from __future__ import annotations

from typing import Any, Sequence


class ConfigError(ValueError):
    """A user mistake in a config or override; the message names the offending key."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """`key=value` must be one of `choices` (the tuple the code that reads the key dispatches on)."""
    check(value in choices, f"{key}={value!r} must be one of {', '.join(map(str, choices))}")


def check_positive(section: Any, prefix: str, keys: Sequence[str], strict: bool = True) -> None:
    """Each `prefix.key` must be > 0 (or >= 0 with strict=False)."""
    for key in keys:
        ok = section[key] > 0 if strict else section[key] >= 0
        check(ok, f"{prefix}.{key}={section[key]} must be {'positive' if strict else '>= 0'}")
