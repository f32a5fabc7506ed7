"""Shared by the launchers: one-line errors, the training command's config check, command runners."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from typing import IO, NoReturn, Sequence

from gqlm.config import ConfigError, apply_override_strings, load_experiment, resolve_mesh_shape, validate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(Exception):
    """A user mistake found before anything is started; main() prints it as one line, exit 2."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"gqlm launch: error: {message}", file=sys.stderr)
    sys.exit(code)


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher args, the command after `--`)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def config_args(command: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """`--config FILE[:arg]` and the `--config.a.b=v` overrides of a gqlm command line."""
    spec, overrides = None, {}
    for i, arg in enumerate(command):
        if arg == "--config" and i + 1 < len(command):
            spec = command[i + 1]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                raise LaunchError(f"override {arg!r} must have the form --config.KEY=VALUE")
            overrides[key] = value
    return spec, overrides


def check_config(command: Sequence[str], num_devices: int, where: str, data_multiple_of: int = 1) -> None:
    """Validates the command's experiment config (mesh, batch, ...) for `num_devices` devices.

    Run before any machine is created, so a mesh that does not fit costs nothing. Commands
    without `--config` (not a gqlm entry point) are not checked.
    """
    spec, overrides = config_args(command)
    if spec is None:
        return
    try:
        config = apply_override_strings(load_experiment(spec), overrides)
        validate(config, num_devices)
        data = resolve_mesh_shape(config.mesh, num_devices)["data"]
        if data % data_multiple_of:
            raise ConfigError(f"mesh.data={data} must be a multiple of the {data_multiple_of} slices "
                              "(the data axis is the one that spans slices)")
    except ConfigError as e:
        raise LaunchError(f"{e} (on {where})") from None


_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def shell_command(command: Sequence[str]) -> str:
    """`command` as one shell line. Leading `VAR=value` words stay assignments (through `env`): quoted
    by shlex.join, bash would run 'VAR=value' as a command name."""
    command = list(command)
    return shlex.join(["env", *command] if command and _ASSIGNMENT.match(command[0]) else command)


def show(argv: Sequence[str]) -> str:
    """A copy-pasteable shell line; `--flag=value` keeps the flag outside the quotes."""
    def quote(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and shlex.quote(flag) == flag:
            return flag + "=" + shlex.quote(value)
        return shlex.quote(arg)
    return " ".join(quote(a) for a in argv)


def stream(proc: subprocess.Popen, prefix: str, sinks: Sequence[IO[str]], lock: threading.Lock) -> None:
    """Copies a process's output lines to every sink, each line prefixed."""
    for line in proc.stdout:
        with lock:
            for sink in sinks:
                sink.write(prefix + line)
                sink.flush()


def run_logged(commands: Sequence[tuple[str, Sequence[str]]], log_path: str | None) -> int:
    """Runs the commands concurrently, streaming prefixed output to stdout (and a log file).

    Returns the first non-zero exit code, else 0.
    """
    sinks: list[IO[str]] = [sys.stdout]
    log = None
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")
        sinks.append(log)
    lock = threading.Lock()
    procs, threads = [], []
    try:
        for prefix, argv in commands:
            proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", bufsize=1)
            thread = threading.Thread(target=stream, args=(proc, prefix, sinks, lock), daemon=True)
            thread.start()
            procs.append(proc)
            threads.append(thread)
        codes = [p.wait() for p in procs]
        for t in threads:
            t.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        if log:
            log.close()
    return next((c for c in codes if c), 0)
