"""Several JAX processes on this machine: the multi-host code path without a cluster.

    python launch/local.py --num_processes 2 --devices_per_process 4 \\
        -- python -m gqlm.train --config experiments/tiny_cpu.py:smoke --workdir /tmp/gqlm_2proc

Each process gets M fake CPU devices (XLA_FLAGS), gloo CPU collectives and gqlm's variables
for `jax.distributed.initialize` (coordinator on a free localhost port). Output lines are
prefixed with the process id. If one process fails, the others are stopped and its exit code
is returned.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/local.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402
from launch.common import LaunchError, fail  # noqa: E402
from launch.multinode import process_env  # noqa: E402

STOP_GRACE_S = 10.0  # after SIGTERM (the trainer saves and exits), before SIGKILL
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port(port: int = 0) -> int:
    """`port` if it can be bound on localhost (0: any free one); LaunchError naming it if taken."""
    if not 0 <= port <= 65535:
        raise LaunchError(f"--port={port} must lie in [0, 65535]")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:  # checked here: process 0 would otherwise die deep inside jax
            raise LaunchError(f"--port={port} cannot be used for the coordinator: {e.strerror}") from None
        return s.getsockname()[1]


class _Terminated(Exception):
    """The launcher got SIGTERM/SIGHUP: stop the process groups it started (they are in their own
    sessions, so the signal does not reach them), then exit 128 + signal."""


def _raise_terminated(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    raise _Terminated(signum)


def process_environments(num_processes: int, devices_per_process: int, port: int,
                         base: dict[str, str] | None = None, timeout_s: int | None = None) -> list[dict[str, str]]:
    """The full environment of each process."""
    base = dict(os.environ if base is None else base)
    flags = _DEVICE_FLAG.sub("", base.get("XLA_FLAGS", "")).strip()
    base["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    base["JAX_PLATFORMS"] = "cpu"
    base["PYTHONUNBUFFERED"] = "1"  # lines appear as they are printed, in order per process
    return [{**base, **process_env(f"127.0.0.1:{port}", num_processes, i, timeout_s=timeout_s)}
            for i in range(num_processes)]


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to each still-running process group (ours: started in a new session), then SIGKILL."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(command: Sequence[str], envs: Sequence[dict[str, str]]) -> int:
    """Runs one process per environment to the end; returns 0 or the exit code of the first that failed."""
    lock = threading.Lock()
    procs, threads = [], []
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        for i, env in enumerate(envs):
            proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1, start_new_session=True)
            procs.append(proc)
            thread = threading.Thread(target=common.stream, args=(proc, f"[{i}] ", [sys.stdout], lock), daemon=True)
            thread.start()
            threads.append(thread)
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            time.sleep(0.1)
        failed = failed if failed is not None else next((i for i, p in enumerate(procs) if p.returncode), None)
        if failed is not None:
            code = procs[failed].returncode
            with lock:
                print(f"gqlm launch: process {failed} exited with code {code}; stopping the others",
                      file=sys.stderr, flush=True)
            _stop(procs)
            return code if code > 0 else 128 - code  # killed by signal S: 128 + S, as a shell reports
        return 0
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    except _Terminated as e:
        _stop(procs)
        return 128 + e.args[0]
    finally:
        _stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in threads:
            t.join(timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    own, command = common.split_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds to wait for every process to join")
    args = parser.parse_args(own)
    try:
        if not command:
            raise LaunchError("give the command to run after `--`")
        if args.num_processes < 1 or args.devices_per_process < 1:
            raise LaunchError("--num_processes and --devices_per_process must be >= 1")
        if shutil.which(command[0]) is None:
            raise LaunchError(f"command {command[0]!r} (after `--`) not found or not executable")
        envs = process_environments(args.num_processes, args.devices_per_process, free_port(args.port),
                                    timeout_s=args.timeout)
    except LaunchError as e:
        fail(str(e))
    return run(command, envs)


if __name__ == "__main__":
    sys.exit(main())
