"""A TPU's life: create it (replacing a preempted or failed one on request), wait for a queued
resource within a bound, find preempted workers, delete it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import NamedTuple, Sequence

from launch.common import LaunchError, show
from launch.tpu_gcloud import Tpu, create_commands, delete_commands, describe_command, node_state_command

QUEUED_POLL_S = 30
DESCRIBE_TRIES = 3  # consecutive failed `describe` calls before the wait gives up
# States a TPU VM or queued resource never leaves by itself: delete it to create it again.
DEAD = ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED")
_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> int:
    """Seconds of a gcloud-style duration (90s, 30m, 6h, 1d, 1h30m) or of a plain number."""
    if text.isdigit():
        return int(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise LaunchError(f"{flag}={text!r} must be a duration such as 90s, 30m, 6h, 1d or 1h30m")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def check_call(argv: Sequence[str]) -> None:
    print(f"+ {show(argv)}", flush=True)
    code = subprocess.call(list(argv))
    if code:
        raise RuntimeError(f"exit code {code} from: {show(argv)}")


class Described(NamedTuple):
    """state: '' when unknown; exists: None when `describe` itself failed; detail: failure data or error."""
    state: str
    exists: bool | None
    detail: str = ""


def describe(t: Tpu) -> Described:
    result = subprocess.run(describe_command(t), capture_output=True, text=True)
    error = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
    if result.returncode:
        return Described("", False if "NOT_FOUND" in result.stderr else None, error)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return Described("", None, f"unreadable answer: {result.stdout.strip()[:200]!r}")
    state = data.get("state", "")
    if isinstance(state, dict):  # a queued resource: {"state": "FAILED", "failedData": {...}}
        failed = state.get("failedData") or {}
        detail = failed.get("error", {}).get("message") or (json.dumps(failed) if failed else "")
        return Described(state.get("state", ""), True, detail)
    return Described(state, True)


def wait_active(t: Tpu, timeout_s: int) -> None:
    """Polls the queued resource until ACTIVE; RuntimeError when it fails, after `timeout_s`, or
    after DESCRIBE_TRIES failed describes in a row."""
    deadline, failures, last = time.monotonic() + timeout_s, 0, ""
    print(f"waiting up to {timeout_s} s for queued resource {t.name} to be ACTIVE", flush=True)
    while True:
        d = describe(t)
        failures = 0 if d.state else failures + 1
        print(f"queued resource {t.name}: {d.state or 'unknown (' + d.detail + ')'}", flush=True)
        if failures >= DESCRIBE_TRIES:
            raise RuntimeError(f"cannot describe queued resource {t.name} ({failures} tries): {d.detail}")
        if d.state == "ACTIVE":
            return
        if d.state in DEAD:
            raise RuntimeError(f"queued resource {t.name} is {d.state}: {d.detail or 'no failure data'}")
        last = d.state or last
        if time.monotonic() >= deadline:
            raise RuntimeError(f"queued resource {t.name} is not ACTIVE after {timeout_s} s "
                               f"(state {last or 'unknown'}); raise --wait_timeout to wait longer")
        time.sleep(max(0.0, min(QUEUED_POLL_S, deadline - time.monotonic())))


def create(t: Tpu, recreate: bool) -> None:
    """Creates the TPU (a queued one is then waited for by wait_active). `recreate`: first delete one that exists in a
    DEAD state; one in any other state is an error, never deleted."""
    if recreate:
        d = describe(t)
        if d.exists and d.state in DEAD:
            print(f"{t.name} is {d.state}: deleting it before creating it again", flush=True)
            delete(t)
        elif d.exists:
            raise RuntimeError(f"{t.name} already exists in state {d.state or 'unknown'}; --recreate replaces "
                               f"only {', '.join(DEAD)} ones (delete it by hand or pick another --name)")
    try:
        for c in create_commands(t):
            check_call(c)
    except RuntimeError as e:
        hint = "" if recreate else f"; if {t.name} exists but was preempted or failed, add --recreate"
        raise RuntimeError(f"{e}{hint}") from None


def delete(t: Tpu) -> None:
    for c in delete_commands(t):
        check_call(c)


def dead_nodes(t: Tpu) -> list[str]:
    """'NODE STATE' for each TPU VM of `t` that is preempted or gone (empty if all are fine or unknown)."""
    dead = []
    for node in t.nodes:
        result = subprocess.run(node_state_command(t, node), capture_output=True, text=True)
        state = result.stdout.strip()
        if state in DEAD or "NOT_FOUND" in result.stderr:
            dead.append(f"{node} {state or 'NOT_FOUND'}")
    return dead
