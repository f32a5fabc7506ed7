"""TPU VMs and pods with gcloud: create, set up, run on every worker, delete.

    python launch/tpu.py launch --name gqlm-v4 --zone us-central2-b --accelerator_type v4-32 \\
        -- python -m gqlm.train --config experiments/dense_125m.py --workdir gs://BUCKET/dense_125m

Subcommands: create | setup | run | delete | launch (= create, setup, run, then delete even on
failure unless --keep). Each takes --dry_run, which prints the exact commands instead of running
them. A queued resource (--queued, implied by --num_slices > 1) waits for capacity; several
slices join over the data-center network, with the `data` mesh axis spanning slices.
The training command's config is validated against the pod's device count before anything is
created; mistakes are one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from typing import NamedTuple, Sequence

if __package__ in (None, ""):  # run as `python launch/tpu.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402
from launch.common import LaunchError, fail, show  # noqa: E402

# Suffix of the accelerator type -> JAX devices. v2/v3 show one device per TensorCore; v4 and
# v5p count TensorCores but pair them per chip (megacore: one device per chip); v5e and v6e count chips.
DEVICES_PER_SUFFIX_UNIT = {"v2": 1.0, "v3": 1.0, "v4": 0.5, "v5p": 0.5, "v5litepod": 1.0, "v6e": 1.0}
DEFAULT_VERSION = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e",
}
QUEUED_POLL_S = 30


class Tpu(NamedTuple):
    name: str
    zone: str
    project: str
    accelerator_type: str | None = None
    version: str | None = None
    num_slices: int = 1
    queued: bool = False
    spot: bool = False
    preemptible: bool = False
    remote_dir: str = "gqlm"

    @property
    def nodes(self) -> list[str]:
        """TPU VM names: one per slice (a queued resource names them PREFIX-0, PREFIX-1, ...)."""
        return [f"{self.name}-{i}" for i in range(self.num_slices)] if self.num_slices > 1 else [self.name]

    @property
    def where(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}"]


def num_devices(accelerator_type: str) -> int:
    """JAX devices of one slice of this accelerator type (e.g. v4-32 -> 16, v5litepod-16 -> 16)."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise LaunchError(f"--accelerator_type={accelerator_type!r} is not one of "
                          f"{', '.join(g + '-N' for g in DEVICES_PER_SUFFIX_UNIT)}")
    generation, size = match.group(1), int(match.group(2))
    devices = size * DEVICES_PER_SUFFIX_UNIT[generation]
    if devices < 1 or devices != int(devices):
        raise LaunchError(f"--accelerator_type={accelerator_type!r} has no whole number of devices")
    return int(devices)


# ----------------------------------------------------------------------------- commands


def create_commands(t: Tpu) -> list[list[str]]:
    version = t.version or DEFAULT_VERSION[t.accelerator_type.split("-")[0]]
    if not t.queued:
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.where,
                 f"--accelerator-type={t.accelerator_type}", f"--version={version}",
                 *(["--spot"] if t.spot else []), *(["--preemptible"] if t.preemptible else [])]]
    nodes = ([f"--node-count={t.num_slices}", f"--node-prefix={t.name}"] if t.num_slices > 1
             else [f"--node-id={t.name}"])
    return [["gcloud", "compute", "tpus", "queued-resources", "create", t.name, *t.where,
             f"--accelerator-type={t.accelerator_type}", f"--runtime-version={version}", *nodes,
             *(["--spot"] if t.spot else [])]]


def wait_command(t: Tpu) -> list[str]:
    """Polled after creating a queued resource until its state is ACTIVE."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", t.name, *t.where,
            "--format=value(state.state)"]


def tarball_path(t: Tpu) -> str:
    return f"/tmp/gqlm-src-{t.name}.tar.gz"


def setup_commands(t: Tpu, jax_version: str) -> list[list[str]]:
    """Copy the packed working tree to every worker of every slice, unpack, install with jax[tpu]."""
    remote = (f"set -e; mkdir -p ~/{t.remote_dir} && tar -xzf ~/gqlm-src.tar.gz -C ~/{t.remote_dir} && "
              f"cd ~/{t.remote_dir} && bash scripts/setup.sh && "
              f'.venv/bin/pip install -q "jax[tpu]=={jax_version}"')
    commands = []
    for node in t.nodes:
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball_path(t), f"{node}:gqlm-src.tar.gz",
                         *t.where, "--worker=all"])
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *t.where, "--worker=all",
                         f"--command={remote}"])
    return commands


def run_commands(t: Tpu, command: Sequence[str], env: Sequence[str] = ()) -> list[list[str]]:
    """The same training command on all workers of all slices (started together), logged on each."""
    variables = " ".join(["GQLM_DISTRIBUTED=auto", *(shlex.quote(e) for e in env)])
    remote = (f"set -o pipefail; cd ~/{t.remote_dir} && . .venv/bin/activate && mkdir -p logs && "
              f"{variables} {shlex.join(command)} 2>&1 | tee -a logs/{t.name}.log")
    return [["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *t.where, "--worker=all", f"--command={remote}"]
            for node in t.nodes]


def delete_commands(t: Tpu) -> list[list[str]]:
    if t.queued:  # --force also deletes the TPU VMs the queued resource created.
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", t.name, *t.where, "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.where, "--quiet"]]


# ----------------------------------------------------------------------------- execution


def pinned_jax_version() -> str:
    with open(os.path.join(common.REPO_ROOT, "setup.py"), encoding="utf-8") as f:
        match = re.search(r'"jax==([0-9][^"]*)"', f.read())
    if not match:
        raise LaunchError("setup.py pins no jax version (expected \"jax==X.Y.Z\")")
    return match.group(1)


def pack_working_tree(path: str) -> int:
    """Tracked and untracked-but-not-ignored files of the repository, as a .tar.gz; returns the count."""
    try:
        listing = subprocess.run(["git", "-C", common.REPO_ROOT, "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"cannot list the working tree of {common.REPO_ROOT} with git: {e}") from None
    files = [f for f in listing.decode().split("\0") if f and os.path.isfile(os.path.join(common.REPO_ROOT, f))]
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(common.REPO_ROOT, f), arcname=f)
    return len(files)


def check_call(argv: Sequence[str]) -> None:
    print(f"+ {show(argv)}", flush=True)
    code = subprocess.call(list(argv))
    if code:
        raise RuntimeError(f"exit code {code} from: {show(argv)}")


def wait_active(t: Tpu) -> None:
    while True:
        state = subprocess.run(wait_command(t), capture_output=True, text=True).stdout.strip()
        print(f"queued resource {t.name}: {state or 'unknown'}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise RuntimeError(f"queued resource {t.name} is {state}")
        time.sleep(QUEUED_POLL_S)


def plan(t: Tpu, step: str, command: Sequence[str], env: Sequence[str], jax_version: str) -> list[str]:
    """The lines --dry_run prints for one step (comments for work done locally)."""
    if step == "create":
        lines = [show(c) for c in create_commands(t)]
        if t.queued:
            lines += [f"# poll until ACTIVE (every {QUEUED_POLL_S} s):", show(wait_command(t))]
        return lines
    if step == "setup":
        return ([f"# pack the working tree (git ls-files --cached --others --exclude-standard) into {tarball_path(t)}"]
                + [show(c) for c in setup_commands(t, jax_version)])
    if step == "run":
        return [show(c) for c in run_commands(t, command, env)]
    return [show(c) for c in delete_commands(t)]


def execute(t: Tpu, step: str, command: Sequence[str], env: Sequence[str], jax_version: str,
            log_file: str) -> int:
    if step == "create":
        for c in create_commands(t):
            check_call(c)
        if t.queued:
            wait_active(t)
    elif step == "setup":
        count = pack_working_tree(tarball_path(t))
        print(f"packed {count} files into {tarball_path(t)}", flush=True)
        for c in setup_commands(t, jax_version):
            check_call(c)
    elif step == "run":
        prefixes = [f"[{node}] " if t.num_slices > 1 else "" for node in t.nodes]
        return common.run_logged(list(zip(prefixes, run_commands(t, command, env))), log_file)
    else:
        for c in delete_commands(t):
            check_call(c)
    return 0


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, command = common.split_command(argv)
    parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("create", "setup", "run", "delete", "launch"))
    parser.add_argument("--name", required=True, help="TPU VM (or queued resource / node prefix) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="default: gcloud's configured project")
    parser.add_argument("--accelerator_type", default=None, help="e.g. v4-32, v5litepod-16, v6e-8, v5p-64")
    parser.add_argument("--version", default=None, help="TPU software version (default per generation)")
    parser.add_argument("--num_slices", type=int, default=1, help="> 1: multi-slice (a queued resource)")
    parser.add_argument("--queued", action="store_true", help="create through a queued resource")
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--preemptible", action="store_true", help="TPU VMs only (queued resources: --spot)")
    parser.add_argument("--remote_dir", default="gqlm", help="directory under each worker's home")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the training command")
    parser.add_argument("--log_file", default=None, help="default: runs/launch/NAME.log")
    parser.add_argument("--keep", action="store_true", help="launch: do not delete at the end")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(own)
    return args, command


def build(args: argparse.Namespace, command: list[str]) -> Tpu:
    """Checks everything that can be checked before anything is created; raises LaunchError."""
    if args.num_slices < 1:
        raise LaunchError(f"--num_slices={args.num_slices} must be >= 1")
    queued = args.queued or args.num_slices > 1
    if queued and args.preemptible:
        raise LaunchError("--preemptible applies to TPU VMs only; queued resources take --spot")
    if args.step in ("create", "launch", "run") and not args.accelerator_type:
        raise LaunchError(f"{args.step} needs --accelerator_type (e.g. v4-32)")
    if args.step in ("run", "launch") and not command:
        raise LaunchError(f"{args.step} needs the training command after `--`")
    for e in args.env:
        if "=" not in e:
            raise LaunchError(f"--env {e!r} must have the form KEY=VALUE")
    if args.accelerator_type:
        devices = num_devices(args.accelerator_type) * args.num_slices
        check_config(command, devices, args)
    if not args.dry_run and shutil.which("gcloud") is None:
        raise LaunchError("gcloud not found on PATH: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`")
    project = args.project
    if project is None and shutil.which("gcloud"):
        project = subprocess.run(["gcloud", "config", "get-value", "project"], capture_output=True,
                                 text=True).stdout.strip() or None
    if not project:
        raise LaunchError("no GCP project: pass --project or run `gcloud config set project PROJECT`")
    return Tpu(args.name, args.zone, project, args.accelerator_type, args.version, args.num_slices, queued,
               args.spot, args.preemptible, args.remote_dir)


def check_config(command: list[str], devices: int, args: argparse.Namespace) -> None:
    slices = f" x {args.num_slices} slices" if args.num_slices > 1 else ""
    common.check_config(command, devices, f"{args.accelerator_type}{slices} = {devices} devices",
                        data_multiple_of=args.num_slices)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        tpu = build(args, command)
        jax_version = pinned_jax_version()
    except LaunchError as e:
        fail(str(e))
    steps = ["create", "setup", "run", "delete"] if args.step == "launch" else [args.step]
    if args.dry_run:
        for step in steps:
            if step == "delete" and args.keep:
                continue
            print("\n".join(plan(tpu, step, command, args.env, jax_version)))
        return 0
    log_file = args.log_file or os.path.join(common.REPO_ROOT, "runs", "launch", f"{tpu.name}.log")
    code = 0
    try:
        for step in steps:
            if step == "delete" and args.step == "launch":
                continue  # in `finally`, so a failed run still releases the TPUs
            code = execute(tpu, step, command, args.env, jax_version, log_file)
            if code:
                print(f"gqlm launch: {step} failed with exit code {code}; log: {log_file}", file=sys.stderr)
                break
    except (RuntimeError, LaunchError) as e:
        print(f"gqlm launch: error: {e}", file=sys.stderr)
        code = 1
    finally:
        if args.step == "launch" and not args.keep:
            try:
                execute(tpu, "delete", command, args.env, jax_version, log_file)
            except RuntimeError as e:
                print(f"gqlm launch: error: could not delete {tpu.name}: {e}; delete it by hand:\n  "
                      + "\n  ".join(show(c) for c in delete_commands(tpu)), file=sys.stderr)
                code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
