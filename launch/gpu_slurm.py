"""Submits a gqlm job to a Slurm GPU cluster: N nodes x G GPUs, one JAX process per GPU.

    python launch/gpu_slurm.py --nodes 2 --gpus_per_node 8 --partition gpu --time 12:00:00 \\
        -- python -m gqlm.train --config experiments/dense_1b.py --workdir /shared/runs/dense_1b

Renders launch/gpu_slurm.sbatch, writes it next to the job's log and runs `sbatch`; --dry_run
prints the rendered script instead. The config is validated for nodes x GPUs devices first.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/gpu_slurm.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402
from launch.common import LaunchError, fail, shell_command  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_slurm.sbatch")
# XLA GPU flags from JAX's GPU performance tips (as MaxText sets them): the latency-hiding
# scheduler overlaps collectives with compute, combined and pipelined collectives for FSDP.
# Every flag is known to the pinned jaxlib (tests/test_launch.py); not yet measured on a GPU here.
GPU_XLA_FLAGS = " ".join((
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
))
EXTRA_LINE = "${EXTRA_SBATCH}\n"


def render(template: str, *, job_name: str, nodes: int, gpus_per_node: int, cpus_per_task: int, time_limit: str,
           output: str, worktree: str, venv: str, command: Sequence[str], extra: Sequence[str] = (),
           xla_flags: str = GPU_XLA_FLAGS) -> str:
    """The sbatch script: `extra` are additional `--key=value` sbatch options, one #SBATCH line each."""
    values = dict(JOB_NAME=job_name, NODES=nodes, GPUS_PER_NODE=gpus_per_node, CPUS_PER_TASK=cpus_per_task,
                  TIME=time_limit, OUTPUT=output, WORKTREE=shlex.quote(worktree), VENV=shlex.quote(venv),
                  COMMAND=shell_command(command), XLA_FLAGS=xla_flags)
    # The options go in after filling, so a `$` in them (--comment=run_${USER}) stays for sbatch.
    head, _, tail = template.partition(EXTRA_LINE)
    lines = "".join(f"#SBATCH {option}\n" for option in extra)
    return string.Template(head).substitute(values) + lines + string.Template(tail).substitute(values)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, command = common.split_command(argv)
    parser = argparse.ArgumentParser(prog="launch/gpu_slurm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus_per_node", type=int, required=True)
    parser.add_argument("--cpus_per_task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="Slurm time limit, e.g. 12:00:00")
    parser.add_argument("--job_name", default="gqlm")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--sbatch", action="append", default=[], help="extra sbatch option, e.g. --qos=high")
    parser.add_argument("--log_dir", default=os.path.join(common.REPO_ROOT, "runs", "slurm"))
    parser.add_argument("--venv", default=os.path.join(common.REPO_ROOT, ".venv"))
    parser.add_argument("--template", default=TEMPLATE)
    parser.add_argument("--xla_flags", default=GPU_XLA_FLAGS,
                        help="XLA_FLAGS the job starts with, as --xla_flags='--a=1 --b=2' (a user's own XLA_FLAGS "
                             "come after them); --xla_flags= for none")
    parser.add_argument("--dry_run", action="store_true", help="print the rendered script, submit nothing")
    return parser.parse_args(own), command


def build(args: argparse.Namespace, command: list[str]) -> str:
    """The rendered script, after every check that needs no cluster; raises LaunchError."""
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(args, key) < 1:
            raise LaunchError(f"--{key}={getattr(args, key)} must be >= 1")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", args.time):
        raise LaunchError(f"--time={args.time!r} must look like 12:00:00 or 1-00:00:00")
    if not command:
        raise LaunchError("give the training command after `--`")
    for option in args.sbatch:
        if not option.startswith("--") or "\n" in option:
            raise LaunchError(f"--sbatch {option!r} must be a long sbatch option such as --qos=high")
    for flag in args.xla_flags.split():  # they go inside a double-quoted shell string
        if not re.fullmatch(r"--\w+(=[\w.,:+-]*)?", flag):
            raise LaunchError(f"--xla_flags: {flag!r} is not an XLA flag like --xla_gpu_x=value")
    if not os.path.isfile(args.template):
        raise LaunchError(f"--template {args.template!r} does not exist")
    devices = args.nodes * args.gpus_per_node
    common.check_config(command, devices, f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {devices} devices")
    extra = ([f"--partition={args.partition}"] if args.partition else []) + \
            ([f"--account={args.account}"] if args.account else []) + list(args.sbatch)
    with open(args.template, encoding="utf-8") as f:
        template = f.read()
    try:
        return render(template, job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      cpus_per_task=args.cpus_per_task, time_limit=args.time,
                      output=os.path.join(os.path.abspath(args.log_dir), f"{args.job_name}-%j.out"),
                      worktree=common.REPO_ROOT, venv=os.path.abspath(args.venv), command=command, extra=extra,
                      xla_flags=args.xla_flags)
    except (KeyError, ValueError) as e:
        raise LaunchError(f"--template {args.template!r}: bad or unknown placeholder {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        script = build(args, command)
        if not args.dry_run and shutil.which("sbatch") is None:
            raise LaunchError("sbatch not found on PATH: run this on a Slurm login node (or use --dry_run)")
    except LaunchError as e:
        fail(str(e))
    if args.dry_run:
        print(script, end="")
        return 0
    os.makedirs(args.log_dir, exist_ok=True)
    path = os.path.join(args.log_dir, f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    with open(path, "w", encoding="utf-8") as f:
        f.write(script)
    result = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if result.returncode:
        print(f"gqlm launch: error: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job = result.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {path}\nlog: {os.path.join(os.path.abspath(args.log_dir), f'{args.job_name}-{job}.out')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
