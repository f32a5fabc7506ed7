"""TPU VMs and pods with gcloud: create, set up, run detached on every worker, follow, delete.

    python launch/tpu.py launch --name gqlm-v4 --zone us-central2-b --accelerator_type v4-32 \\
        -- python -m gqlm.train --config experiments/dense_125m.py --workdir gs://BUCKET/dense_125m

Subcommands: create | setup | run | delete | launch (= create, setup, run, then delete once the
job has ended, unless --keep) | logs | status | stop (work from any machine). The job runs
detached on every worker and leaves an exit marker; a dropped ssh or a closed terminal does not
stop it, and the TPU is deleted only when the markers say the job ended. Each subcommand takes
--dry_run, which prints the exact commands instead of running them. A queued resource (--queued,
implied by --num_slices > 1, --reserved or --valid_until_duration) waits for capacity within
--wait_timeout; several slices join over the data-center network, with the `data` mesh axis
spanning slices. The training command's config is validated against the pod's device count
before anything is created; mistakes are one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/tpu.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common, tpu_gcloud, tpu_job, tpu_resource  # noqa: E402
from launch.common import LaunchError, fail, show  # noqa: E402
from launch.tpu_gcloud import Tpu, num_devices, num_hosts  # noqa: E402

STEPS = ("create", "setup", "run", "delete", "launch", "logs", "status", "stop")
DEFAULT_WAIT = "24h"
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_REMOTE_DIR = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, command = common.split_command(argv)
    parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("step", choices=STEPS)
    add("--name", required=True, help="TPU VM (or queued resource / node prefix) name")
    add("--zone", required=True)
    add("--project", default=None, help="default: gcloud's configured project")
    add("--accelerator_type", default=None, help="e.g. v4-32, v5litepod-16, v6e-8, v5p-64")
    add("--version", default=None, help="TPU software version (default per generation)")
    add("--num_slices", type=int, default=1, help="> 1: multi-slice (a queued resource)")
    add("--queued", action="store_true", help="create through a queued resource")
    add("--reserved", action="store_true", help="queued resource from your reservation")
    add("--valid_until_duration", default=None, help="queued request expires after this, e.g. 6h")
    add("--wait_timeout", default=None, help=f"max wait for a queued resource (default: "
                                             f"--valid_until_duration, else {DEFAULT_WAIT})")
    add("--spot", action="store_true")
    add("--preemptible", action="store_true", help="TPU VMs only (queued resources: --spot)")
    add("--recreate", action="store_true", help="create: first delete a PREEMPTED/FAILED/... one of this name")
    add("--remote_dir", default="gqlm", help="directory under each worker's home")
    add("--setup_command", default=None, help="run in the unpacked tree on every worker "
                                              "(default: scripts/setup.sh, then jax[tpu])")
    add("--env", action="append", default=[], help="KEY=VALUE for the training command (repeatable)")
    add("--worker", type=int, default=0, help="logs: the worker whose log to follow")
    add("--log_file", default=None, help="default: runs/launch/NAME.log")
    add("--keep", action="store_true", help="launch: do not delete at the end")
    add("--dry_run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(own), command


def check_arguments(args: argparse.Namespace, command: list[str]) -> None:
    """Checks that need neither gcloud nor the config; fills args.env_pairs and args.wait_s."""
    if not _NAME.fullmatch(args.name):
        raise LaunchError(f"--name={args.name!r} must be lower-case letters, digits and '-', starting with a letter")
    if not _REMOTE_DIR.fullmatch(args.remote_dir) or ".." in args.remote_dir.split("/"):
        raise LaunchError(f"--remote_dir={args.remote_dir!r} must be a plain relative path")
    if args.num_slices < 1:
        raise LaunchError(f"--num_slices={args.num_slices} must be >= 1")
    args.queued = args.queued or args.num_slices > 1 or args.reserved or bool(args.valid_until_duration)
    if args.queued and args.preemptible:
        raise LaunchError("--preemptible applies to TPU VMs only; queued resources take --spot")
    if args.step in ("create", "launch", "run") and not args.accelerator_type:
        raise LaunchError(f"{args.step} needs --accelerator_type (e.g. v4-32)")
    if args.worker < 0 or (args.accelerator_type and args.worker >= num_hosts(args.accelerator_type)):
        raise LaunchError(f"--worker={args.worker} must lie in [0, workers per slice"
                          + (f" = {num_hosts(args.accelerator_type)})" if args.accelerator_type else ")"))
    if args.step in ("run", "launch") and not command:
        raise LaunchError(f"{args.step} needs the training command after `--`")
    args.env_pairs = tpu_job.parse_env(args.env)
    if args.valid_until_duration:
        tpu_resource.parse_duration(args.valid_until_duration, "--valid_until_duration")
    wait = args.wait_timeout or args.valid_until_duration or DEFAULT_WAIT
    args.wait_s = tpu_resource.parse_duration(wait, "--wait_timeout" if args.wait_timeout else "--valid_until_duration")


def build(args: argparse.Namespace, command: list[str]) -> Tpu:
    """Checks everything that can be checked before anything is created; raises LaunchError."""
    check_arguments(args, command)
    if args.accelerator_type:
        devices = num_devices(args.accelerator_type) * args.num_slices
        slices = f" x {args.num_slices} slices" if args.num_slices > 1 else ""
        common.check_config(command, devices, f"{args.accelerator_type}{slices} = {devices} devices",
                            data_multiple_of=args.num_slices)
    args.workers = num_hosts(args.accelerator_type) * args.num_slices if args.accelerator_type else None
    if not args.dry_run and shutil.which("gcloud") is None:
        raise LaunchError("gcloud not found on PATH: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`")
    project = args.project
    if project is None and shutil.which("gcloud"):
        project = subprocess.run(["gcloud", "config", "get-value", "project"], capture_output=True,
                                 text=True).stdout.strip() or None
    if not project:
        raise LaunchError("no GCP project: pass --project or run `gcloud config set project PROJECT`")
    args.install = args.setup_command or tpu_gcloud.default_install(tpu_gcloud.pinned_jax_version())
    return Tpu(args.name, args.zone, project, args.accelerator_type, args.version, args.num_slices, args.queued,
               args.spot, args.preemptible, args.remote_dir, args.reserved, args.valid_until_duration)


def plan(t: Tpu, step: str, args: argparse.Namespace, command: Sequence[str]) -> list[str]:
    """The lines --dry_run prints for one step (comments for work done locally)."""
    if step == "create":
        lines = [show(c) for c in tpu_gcloud.create_commands(t)]
        if t.queued:
            lines += [f"# poll until ACTIVE (every {tpu_resource.QUEUED_POLL_S} s, at most {args.wait_s} s):",
                      show(tpu_gcloud.describe_command(t))]
        return lines
    if step == "setup":
        return ([f"# pack the working tree (git ls-files --cached --others --exclude-standard) into "
                 f"{tpu_gcloud.tarball_path(t)}"] + [show(c) for c in tpu_gcloud.setup_commands(t, args.install)])
    if step == "run":
        return ([show(tpu_gcloud.ssh(t, node, tpu_job.start_script(t, command, args.env_pairs))) for node in t.nodes]
                + plan(t, "logs", args, command))
    if step == "logs":
        return ([f"# follow worker {args.worker}'s log until every worker has an exit marker "
                 "(reattaching after a dropped connection):",
                 show(tpu_gcloud.ssh(t, t.nodes[0], tpu_job.follow_script(t, 0), worker=str(args.worker)))]
                + plan(t, "status", args, command))
    if step in ("status", "stop"):
        script = tpu_job.status_script(t) if step == "status" else tpu_job.stop_script(t)
        return [show(tpu_gcloud.ssh(t, node, script)) for node in t.nodes]
    return ["# once every worker's exit marker is there:" if args.step == "launch" else "# delete:"] + \
        [show(c) for c in tpu_gcloud.delete_commands(t)]


# ----------------------------------------------------------------------------- execution


def same_tpu_flags(t: Tpu) -> str:
    """The flags that name this TPU in a later `launch/tpu.py` call."""
    flags = [f"--name {t.name}", f"--zone {t.zone}", f"--project {t.project}"]
    flags += [f"--num_slices {t.num_slices}"] if t.num_slices > 1 else []
    flags += ["--queued"] if t.queued else []
    flags += [f"--remote_dir {t.remote_dir}"] if t.remote_dir != "gqlm" else []
    return " ".join(flags)


def recovery_hint(t: Tpu) -> str:
    same = same_tpu_flags(t)
    return ("nothing was deleted; the job may still be running. From any machine:\n"
            f"  python launch/tpu.py logs   {same}   # follow it again (ends when the job ends)\n"
            f"  python launch/tpu.py status {same}\n"
            f"  python launch/tpu.py stop   {same}   # SIGTERM: the trainer saves a checkpoint\n"
            f"  python launch/tpu.py delete {same}   # when done (or --recreate on the next create)")


def follow(t: Tpu, args: argparse.Namespace) -> int:
    """Follows the job's log, copied to the local log file; returns the job's exit code."""
    os.makedirs(os.path.dirname(os.path.abspath(args.log_file)), exist_ok=True)
    with open(args.log_file, "a", encoding="utf-8") as log:
        code = tpu_job.follow(t, [sys.stdout, log], args.workers, args.worker)
    print(f"gqlm launch: job {t.name} ended with exit code {code} on every worker; log: {args.log_file}",
          file=sys.stderr if code else sys.stdout, flush=True)
    return code


def execute(t: Tpu, step: str, args: argparse.Namespace, command: Sequence[str]) -> int:
    if step == "create":
        tpu_resource.create(t, args.recreate)
        args.created = True
        if t.queued:
            tpu_resource.wait_active(t, args.wait_s)
    elif step == "setup":
        count = tpu_gcloud.pack_working_tree(tpu_gcloud.tarball_path(t))
        print(f"packed {count} files into {tpu_gcloud.tarball_path(t)}", flush=True)
        for c in tpu_gcloud.setup_commands(t, args.install):
            tpu_resource.check_call(c)
    elif step in ("run", "logs"):
        if step == "run":
            tpu_job.start(t, command, args.env_pairs, args.workers)
            args.started = True
        code = follow(t, args)
        args.ended = True
        return code
    elif step == "status":
        state = tpu_job.job_state(t, args.workers, echo=True)
        dead = tpu_resource.dead_nodes(t) if state.kind == "unknown" else []
        print(f"job {t.name}: {state.kind}" + (f", exit code {state.code}" if state.kind == "ended" else "")
              + "".join(f"; {d}" for d in [state.detail, *dead] if d))
        return 0 if state.kind in ("running", "ended") else 1
    elif step == "stop":
        return tpu_job.stop(t)
    else:
        tpu_resource.delete(t)
    return 0


def finish_launch(t: Tpu, args: argparse.Namespace, code: int) -> int:
    """Deletes the TPU after a launch: when the job ended, or when none was started."""
    if args.started and not args.ended:
        print(f"gqlm launch: {recovery_hint(t)}", file=sys.stderr)
        return code
    if args.keep or not args.created:
        return code
    try:
        tpu_resource.delete(t)
    except RuntimeError as e:
        print(f"gqlm launch: error: could not delete {t.name}: {e}; delete it by hand:\n  "
              + "\n  ".join(show(c) for c in tpu_gcloud.delete_commands(t)), file=sys.stderr)
        code = code or 1
    return code


def run_steps(t: Tpu, args: argparse.Namespace, command: Sequence[str]) -> int:
    args.created = args.started = args.ended = False
    code = 0
    try:
        for step in ["create", "setup", "run"] if args.step == "launch" else [args.step]:
            code = execute(t, step, args, command)
            if code:
                print(f"gqlm launch: {step} failed with exit code {code}; log: {args.log_file}", file=sys.stderr)
                break
    except KeyboardInterrupt:
        code = 130
        if args.started and not args.ended:
            print(f"\ngqlm launch: detached from {t.name}", file=sys.stderr)
    except (RuntimeError, LaunchError) as e:
        print(f"gqlm launch: error: {e}", file=sys.stderr)
        code = 1
        if args.step in ("run", "logs") and isinstance(e, tpu_job.JobNotEnded):
            print(f"gqlm launch: {recovery_hint(t)}", file=sys.stderr)
    if args.step == "launch":
        code = finish_launch(t, args, code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        tpu = build(args, command)
    except LaunchError as e:
        fail(str(e))
    if args.dry_run:
        steps = ["create", "setup", "run"] + ([] if args.keep else ["delete"]) if args.step == "launch" else [args.step]
        print("\n".join(line for step in steps for line in plan(tpu, step, args, command)))
        return 0
    args.log_file = args.log_file or os.path.join(common.REPO_ROOT, "runs", "launch", f"{tpu.name}.log")
    return run_steps(tpu, args, command)


if __name__ == "__main__":
    sys.exit(main())
