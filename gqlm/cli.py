"""Shared command-line plumbing: `--config FILE[:arg]` plus `--config.a.b=value` overrides.

absl parses the regular flags; overrides are taken out first and applied to the locked config,
so an unknown key or a value of the wrong type is a one-line error (exit code 2), never a no-op.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app, flags, logging

from gqlm import distributed
from gqlm.config import ConfigDict, ConfigError, apply_overrides, load_experiment

FLAGS = flags.FLAGS
_OVERRIDES: dict[str, str] = {}


def fail(message: str) -> NoReturn:
    print(f"gqlm: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    rest = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                fail(f"override {arg!r} must have the form --config.KEY=VALUE")
            _OVERRIDES[key] = value
        else:
            rest.append(arg)
    try:
        return FLAGS(rest)
    except flags.Error as e:
        fail(str(e))


def config_from_flags(flag_value: str) -> ConfigDict:
    """The experiment file's config with the command line's overrides applied."""
    if not flag_value:
        fail("--config is required (an experiment file, e.g. experiments/tiny_cpu.py)")
    return apply_overrides(load_experiment(flag_value), _OVERRIDES)


def run(main: Callable[[list[str]], None]) -> None:
    """absl.app.run with gqlm's flag parsing; user errors exit 2 with one line on stderr."""
    def guarded(argv):
        if not FLAGS["verbosity"].present:  # Library INFO/WARNING logs (orbax, tfds) drown the progress bar.
            logging.set_verbosity(logging.ERROR)
        try:
            distributed.maybe_initialize()  # Before any other jax call; no-op for one process.
            main(argv)
        except ConfigError as e:
            fail(str(e))
    app.run(guarded, flags_parser=parse_flags)


def overrides() -> dict[str, str]:
    """The `--config.a.b=value` overrides given on the command line."""
    return dict(_OVERRIDES)
