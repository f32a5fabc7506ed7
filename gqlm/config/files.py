"""Experiment files, saved configs and programmatic overrides.

The command line goes through `ml_collections.config_flags` (gqlm/cli.py); these functions serve
code that builds configs itself (sweeps, benchmarks, launchers, tests).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from gqlm.config.errors import ConfigError


def load_python_file(path: str, what: str) -> Any:
    """Imports a user's Python file (experiment, sweep) by path; ConfigError naming it if that fails."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("gqlm_user_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A broken user file is a user error: report it in one line.
        raise ConfigError(f"{what} {path!r} failed to load: {type(e).__name__}: {e}")
    return module


def load_experiment(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/exp.py[:arg]` and returns its locked config."""
    path, _, arg = spec.partition(":")
    module = load_python_file(path, "experiment file")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment file {path!r} defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ConfigError, ValueError, KeyError) as e:
        raise ConfigError(f"experiment file {path!r}: get_config({arg!r}) failed: {e}")
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets `config.<dotted key> = value` for each override (typed values, as `config_flags` gives
    them); an unknown key or a value of the wrong type is a ConfigError naming the key."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in override {key!r})")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section, not a value")
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            with node.unlocked():
                node[leaf] = value  # ConfigDict's own type check (int -> float allowed)
        except TypeError:
            raise ConfigError(f"config key {key!r} expects {type(node[leaf]).__name__}, got {value!r} "
                              f"({type(value).__name__})") from None
    return config


def check_override_keys(config: ml_collections.ConfigDict, keys: list[str]) -> None:
    """Each dotted key must name a value (not a section) of `config`; ConfigError naming it."""
    for key in keys:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (in override {key!r})")
            node = node[part]
        if isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section, not a value")


def parse_overrides(config: ml_collections.ConfigDict, texts: dict[str, str]) -> dict[str, Any]:
    """Command-line text (`{"model.num_layers": "4"}`) typed by `config`'s schema, parsed by
    `ml_collections.config_flags` exactly as `--config.model.num_layers=4` would be."""
    check_override_keys(config, list(texts))
    argv = ["gqlm"] + [f"--config.{key}={text}" for key, text in texts.items()]
    holder = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config.copy_and_resolve_references(), flag_values=holder,
                                    sys_argv=argv)
    try:
        holder(argv)
    except flags.Error as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return config_flags.get_override_values(holder["config"])


def apply_override_strings(config: ml_collections.ConfigDict, texts: dict[str, str]) -> ml_collections.ConfigDict:
    """`apply_overrides` of command-line text (launchers, benchmarks: `a.b=value` arguments)."""
    return apply_overrides(config, parse_overrides(config, texts))


def to_tuples(value: Any) -> Any:
    """JSON lists back to the tuples a config holds."""
    return tuple(to_tuples(v) for v in value) if isinstance(value, list) else value
