"""Shared command-line plumbing: `--config FILE[:arg]` and `--config.a.b=value` overrides, parsed by
`ml_collections.config_flags`; user errors are one line on stderr and exit code 2, never a no-op.

Two kinds of entry points: those that start from an experiment file (`define_config_file`:
train) and those that start from a saved run (`define_config_overrides`: eval, sample, score),
whose `--config.a.b=value` overrides apply to the run's saved config (`overrides()`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from gqlm import distributed
from gqlm.config import ConfigDict, ConfigError, base_config, check_override_keys, load_experiment

FLAGS = flags.FLAGS
CONFIG_FLAG = "config"


def fail(message: str) -> NoReturn:
    print(f"gqlm: error: {message}", file=sys.stderr)
    sys.exit(2)


def define_config_file() -> None:
    """`--config path.py[:arg]` (required) with `--config.a.b=value` overrides."""
    config_flags.DEFINE_config_file(CONFIG_FLAG, None, "Experiment file, optionally with an argument: path.py[:arg].")


def define_config_overrides() -> None:
    """`--config.a.b=value` overrides of a saved run's config, typed by the schema. config_flags
    parses them as the flag is defined (from sys.argv), so their errors are reported here."""
    try:
        check_override_keys(base_config(), _override_keys(sys.argv))
        config_flags.DEFINE_config_dict(CONFIG_FLAG, base_config(), "Overrides of the saved run's config.")
    except ConfigError as e:
        fail(str(e))
    except flags.Error as e:
        fail(str(e).splitlines()[0])


def define_saved_run_flags(workdir_help: str = "A training workdir with checkpoints.") -> None:
    """The flags of every command that reads a saved run: --workdir, --step and overrides."""
    define_config_overrides()
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that verifies).")


def _override_keys(argv: list[str]) -> list[str]:
    prefix = f"--{CONFIG_FLAG}."
    return [arg[len(prefix):].partition("=")[0] for arg in argv if arg.startswith(prefix)]


def _schema_for_overrides(argv: list[str]) -> ConfigDict:
    """The config the overrides apply to: the experiment file's (loaded once here, so that its
    errors are one line) or, for a saved run, the schema."""
    if FLAGS[CONFIG_FLAG].default is not None:  # define_config_overrides: the schema
        return base_config()
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{CONFIG_FLAG}=")), None)
    if spec is None and f"--{CONFIG_FLAG}" in argv[:-1]:
        spec = argv[argv.index(f"--{CONFIG_FLAG}") + 1]
    if spec is None:
        fail(f"--{CONFIG_FLAG} is required (an experiment file, e.g. experiments/tiny_cpu.py)")
    return load_experiment(spec)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with the config's errors (unknown key, wrong type, broken file) as one line."""
    try:
        if CONFIG_FLAG in FLAGS:
            check_override_keys(_schema_for_overrides(argv), _override_keys(argv))
        return FLAGS(argv)
    except ConfigError as e:
        fail(str(e))
    except flags.Error as e:
        fail(str(e).splitlines()[0])


def config() -> ConfigDict:
    """The experiment file's config with the command line's overrides applied."""
    return FLAGS[CONFIG_FLAG].value


def overrides() -> dict[str, Any]:
    """The `--config.a.b=value` overrides given on the command line, typed by the schema."""
    return config_flags.get_override_values(FLAGS[CONFIG_FLAG])


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
