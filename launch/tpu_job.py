"""The training job on a TPU's workers: started detached, followed, reattached, stopped.

Each worker runs the command under `setsid nohup` (a new session: a dropped ssh sends it no
SIGHUP) and keeps three files in ~/REMOTE_DIR/logs: NAME.pid (the job's process group),
NAME.log (its output) and NAME.exit (its exit code, written when it ends: the exit marker).
The launcher only reads these files over ssh, so a lost connection or terminal loses nothing:
`follow` reattaches, and `launch/tpu.py logs|status|stop` work from any machine.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from typing import IO, NamedTuple, Sequence

from launch.common import LaunchError, shell_command, show
from launch.tpu_gcloud import Tpu, ssh
from launch.tpu_resource import dead_nodes

POLL_S = 10  # between status checks while following, and before reattaching
REATTACH_TRIES = 60  # status checks in a row that reach no worker before `follow` gives up
STOP_GRACE_S = 120  # after SIGTERM (the trainer saves a checkpoint), before SIGKILL
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"  # left behind by a killed process, it blocks the next one
TPU_DEVICES = "/dev/accel* /dev/vfio/[0-9]*"  # v2-v4 / v5+ chips
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STATUS = re.compile(r"gqlm-job (\S+): (running|exited (-?\d+)|lost|none|busy|started)\s*$")


class JobNotEnded(RuntimeError):
    """The launcher stopped following, but no exit marker says the job ended: keep the TPU."""


def parse_env(pairs: Sequence[str]) -> list[tuple[str, str]]:
    """--env KEY=VALUE pairs; LaunchError for a missing `=` or a key the shell cannot assign."""
    parsed = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not _ENV_KEY.fullmatch(key):
            raise LaunchError(f"--env {pair!r} must have the form KEY=VALUE with KEY a shell variable name")
        parsed.append((key, value))
    return parsed


def _files(t: Tpu) -> str:
    return f"logs/{t.name}"


def _clean_tpu() -> str:
    """Kills processes still holding the TPU chips or libtpu's lock file, then removes the lock."""
    held = f"{TPU_DEVICES} {LIBTPU_LOCKFILE}"
    return (f'p=$( (sudo -n lsof -t {held}; lsof -t {held}) 2>/dev/null | sort -u); '
            f'[ -z "$p" ] || sudo -n kill -9 $p 2>/dev/null || kill -9 $p; '
            f"sudo -n rm -f {LIBTPU_LOCKFILE} 2>/dev/null || rm -f {LIBTPU_LOCKFILE}")


def _alive(f: str) -> str:
    return f'[ -f {f}.pid ] && kill -0 "$(cat {f}.pid)" 2>/dev/null'


def start_script(t: Tpu, command: Sequence[str], env: Sequence[tuple[str, str]]) -> str:
    """Starts the job detached on one worker; prints `gqlm-job HOST: started` (or `busy`, exit 3)."""
    f = _files(t)
    exports = "".join(f"export {key}={shlex.quote(value)}; " for key, value in env)
    # The trap makes the wrapper outlive SIGTERM/SIGINT to its group long enough to write the marker.
    job = (f"echo $$ > {f}.pid.tmp && mv {f}.pid.tmp {f}.pid; trap true TERM INT HUP; "
           f". .venv/bin/activate; export GQLM_DISTRIBUTED=auto; {exports}"
           f"{shell_command(command)} > {f}.log 2>&1 < /dev/null; "
           f"echo $? > {f}.exit.tmp && mv {f}.exit.tmp {f}.exit")
    return (f"cd ~/{t.remote_dir} && mkdir -p logs || exit 1; h=$(hostname); "
            f'if [ ! -f {f}.exit ] && {_alive(f)}; then echo "gqlm-job $h: busy"; exit 3; fi; '
            f"{_clean_tpu()}; rm -f {f}.pid {f}.exit; "
            f"if [ -f {f}.log ]; then mv {f}.log {f}.$(date +%Y%m%d-%H%M%S).log; fi; "
            f"setsid nohup bash -c {shlex.quote(job)} > /dev/null 2>&1 < /dev/null & "
            f"for i in $(seq 100); do [ -f {f}.pid ] && break; sleep 0.1; done; "
            f'[ -f {f}.pid ] && echo "gqlm-job $h: started"')


def status_script(t: Tpu) -> str:
    """One line per worker: `gqlm-job HOST: running | exited CODE | lost | none`."""
    f = _files(t)
    return (f"cd ~/{t.remote_dir} 2>/dev/null; h=$(hostname); "
            f'if [ -f {f}.exit ]; then echo "gqlm-job $h: exited $(cat {f}.exit)"; '
            f'elif {_alive(f)}; then echo "gqlm-job $h: running"; '
            f'elif [ -f {f}.pid ]; then echo "gqlm-job $h: lost"; else echo "gqlm-job $h: none"; fi')


def stop_script(t: Tpu) -> str:
    """SIGTERM to the job's process group, SIGKILL after STOP_GRACE_S; an exit marker (143) if
    none was written; the TPU cleaned; then the status line."""
    f = _files(t)
    return (f"cd ~/{t.remote_dir} 2>/dev/null || exit 0; "
            f"if {_alive(f)}; then p=$(cat {f}.pid); kill -TERM -- -$p; "
            f"for i in $(seq {STOP_GRACE_S * 5}); do kill -0 $p 2>/dev/null || break; sleep 0.2; done; "
            f"kill -KILL -- -$p 2>/dev/null; fi; "
            f"if [ -f {f}.pid ] && [ ! -f {f}.exit ]; then echo 143 > {f}.exit; fi; "
            f"{_clean_tpu()}; {status_script(t)}")


def follow_script(t: Tpu, skip: int) -> str:
    """Prints the log from line skip + 1 until the job's process has ended."""
    f = _files(t)
    return (f"cd ~/{t.remote_dir} || exit 1; for i in $(seq 30); do [ -f {f}.pid ] && break; sleep 1; done; "
            f'[ -f {f}.pid ] || exit 1; tail -n +{skip + 1} -F --pid="$(cat {f}.pid)" {f}.log 2>/dev/null')


# ----------------------------------------------------------------------------- reading the workers


class JobState(NamedTuple):
    """kind: running | ended | none (never started) | lost (no marker, not running) | unknown."""
    kind: str
    code: int = 0
    detail: str = ""


def job_state(t: Tpu, expected_workers: int | None = None, echo: bool = False) -> JobState:
    """The job's state from every worker's files; `unknown` unless every worker answered."""
    found, errors = [], []
    for node in t.nodes:
        result = subprocess.run(ssh(t, node, status_script(t)), capture_output=True, text=True)
        lines = [m for m in map(_STATUS.match, result.stdout.splitlines()) if m]
        found += lines
        if result.returncode:
            errors.append((result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1])
        if echo:
            print("\n".join(f"{node}: {m.group(0)}" for m in lines), flush=True)
    if errors or not found or (expected_workers and len(found) != expected_workers):
        return JobState("unknown", detail="; ".join(errors) or f"{len(found)} of {expected_workers} workers answered")
    states = [m.group(2).split()[0] for m in found]
    if "running" in states:
        return JobState("running")
    if all(s == "exited" for s in states):
        return JobState("ended", next((c for c in (int(m.group(3)) for m in found) if c), 0))
    kind = "none" if all(s == "none" for s in states) else "lost"
    return JobState(kind, detail=", ".join(f"{m.group(1)} {m.group(2)}" for m in found))


def _stream(argv: Sequence[str], prefix: str, sinks: Sequence[IO[str]]) -> tuple[int, int]:
    """(complete lines copied to the sinks, exit code) of one ssh."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    lines = 0
    for line in proc.stdout:
        if not line.endswith("\n"):
            break  # cut by a dropped connection: read again on reattach
        lines += 1
        for sink in sinks:
            sink.write(prefix + line)
            sink.flush()
    return lines, proc.wait()


def follow(t: Tpu, sinks: Sequence[IO[str]], expected_workers: int | None = None, worker: int = 0) -> int:
    """Streams one worker's log until every worker has an exit marker; returns the job's exit code.

    A dropped ssh is not the job's end: follow reads the markers and reattaches where it left
    off. JobNotEnded when the job is gone without a marker, a TPU VM was preempted, or the
    workers stay unreachable for REATTACH_TRIES checks.
    """
    prefix = f"[{t.nodes[0]}] " if t.num_slices > 1 else ""
    seen, failures = 0, 0
    while True:
        lines, code = _stream(ssh(t, t.nodes[0], follow_script(t, seen), worker=str(worker)), prefix, sinks)
        seen += lines
        state = job_state(t, expected_workers)
        if state.kind == "ended":
            return state.code
        if state.kind in ("none", "lost"):
            raise JobNotEnded(f"no job {t.name} is running and not every worker has an exit marker "
                              f"(killed, or the host restarted): {state.detail}")
        # A follow ssh that keeps failing (e.g. a --worker the pod lacks) counts even while the job runs.
        failures = 0 if state.kind == "running" and (lines or not code) else failures + 1
        if failures >= REATTACH_TRIES and state.kind == "running":
            raise JobNotEnded(f"cannot read worker {worker}'s log of {t.name} in {failures} tries "
                              f"(ssh exit code {code}); the job is running")
        if state.kind == "unknown":
            dead = dead_nodes(t)
            if dead:
                raise JobNotEnded(f"TPU VM {', '.join(dead)}: the job on it is lost")
            if failures >= REATTACH_TRIES:
                raise JobNotEnded(f"no answer from the workers of {t.name} in {failures} tries: {state.detail}")
        if code or state.kind == "unknown":
            print(f"gqlm launch: connection to {t.name} lost (ssh exit code {code}; job {state.kind}); "
                  f"reattaching in {POLL_S} s", file=sys.stderr, flush=True)
        time.sleep(POLL_S)


def start(t: Tpu, command: Sequence[str], env: Sequence[tuple[str, str]],
          expected_workers: int | None = None) -> None:
    """Starts the job detached on every worker of every slice; RuntimeError if it did not start
    (a failed ssh whose job is running anyway is only reported)."""
    failed = []
    for node in t.nodes:
        argv = ssh(t, node, start_script(t, command, env))
        print(f"+ {show(argv)}", flush=True)
        result = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        print(result.stdout, end="", flush=True)
        if "busy" in {m.group(2) for m in map(_STATUS.match, result.stdout.splitlines()) if m}:
            raise RuntimeError(f"a job {t.name} is still running on {node}: follow it with `launch/tpu.py logs` "
                               "or end it with `launch/tpu.py stop`")
        if result.returncode:
            failed.append(f"{node} (exit code {result.returncode})")
    if failed:
        state = job_state(t, expected_workers)
        if state.kind != "running":
            raise RuntimeError(f"the job did not start on {', '.join(failed)}: {state.kind} {state.detail}")
        print(f"gqlm launch: ssh to {', '.join(failed)} failed, but the job is running", file=sys.stderr)


def stop(t: Tpu) -> int:
    """Stops the job on every worker (SIGTERM, then SIGKILL) and prints each worker's state."""
    code = 0
    for node in t.nodes:
        argv = ssh(t, node, stop_script(t))
        print(f"+ {show(argv)}", flush=True)
        result = subprocess.call(argv)  # every slice is stopped, even after one ssh failed
        code = code or result
    return code
