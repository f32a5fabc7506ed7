"""Plain multi-node (no Slurm, no TPU): run this on every node with its own --process_id.

    # node 0 (its address must be reachable from the others):
    python launch/multinode.py --coordinator 10.0.0.1:12345 --num_processes 2 --process_id 0 \\
        -- python -m gqlm.train --config experiments/dense_1b.py --workdir /shared/runs/dense_1b
    # node 1: the same with --process_id 1

It sets gqlm's variables (GQLM_COORDINATOR_ADDRESS, GQLM_NUM_PROCESSES, GQLM_PROCESS_ID and
optionally GQLM_LOCAL_DEVICE_IDS) and replaces itself with the command; the command's
`gqlm.distributed.maybe_initialize()` then calls `jax.distributed.initialize`. One process per
node drives all of the node's GPUs unless --local_device_ids splits them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/multinode.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402
from launch.common import LaunchError, fail  # noqa: E402
from gqlm import distributed  # noqa: E402
from gqlm.config import ConfigError  # noqa: E402


def process_env(coordinator: str, num_processes: int, process_id: int, local_device_ids: str = "",
                timeout_s: int | None = None) -> dict[str, str]:
    """gqlm's variables for one process, checked as gqlm.distributed will read them."""
    env = {distributed.ENV_COORDINATOR: coordinator, distributed.ENV_NUM_PROCESSES: str(num_processes),
           distributed.ENV_PROCESS_ID: str(process_id)}
    if local_device_ids:
        env[distributed.ENV_LOCAL_DEVICE_IDS] = local_device_ids
    if timeout_s is not None:
        env[distributed.ENV_TIMEOUT] = str(timeout_s)
    try:
        distributed.detect(env)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    return env


def main(argv: Sequence[str] | None = None) -> int:
    own, command = common.split_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="launch/multinode.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--local_device_ids", default="", help="e.g. 0,1,2,3 (default: all local GPUs)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds to wait for every process")
    parser.add_argument("--dry_run", action="store_true", help="print the environment and command")
    args = parser.parse_args(own)
    try:
        if not command:
            raise LaunchError("give the command to run after `--`")
        env = process_env(args.coordinator, args.num_processes, args.process_id, args.local_device_ids, args.timeout)
    except LaunchError as e:
        fail(str(e))
    if args.dry_run:
        print(common.show([f"{k}={v}" for k, v in env.items()] + command))
        return 0
    os.execvpe(command[0], command, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
