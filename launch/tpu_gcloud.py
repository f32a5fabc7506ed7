"""The gcloud command lines of launch/tpu.py: TPU VMs, queued resources, scp and ssh to workers.

Only builders here (lists of argv); launch/tpu_resource.py and launch/tpu_job.py run them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from typing import NamedTuple

from launch import common
from launch.common import LaunchError

# Suffix of the accelerator type -> JAX devices. v2/v3 show one device per TensorCore; v4 and
# v5p count TensorCores but pair them per chip (megacore: one device per chip); v5e and v6e count chips.
DEVICES_PER_SUFFIX_UNIT = {"v2": 1.0, "v3": 1.0, "v4": 0.5, "v5p": 0.5, "v5litepod": 1.0, "v6e": 1.0}
# JAX devices per host: 8 TensorCores (v2/v3) or 4 chips; v5e/v6e slices of up to 8 chips are one host.
DEVICES_PER_HOST = {"v2": 8, "v3": 8, "v4": 4, "v5p": 4, "v5litepod": 4, "v6e": 4}
SINGLE_HOST_UP_TO = {"v5litepod": 8, "v6e": 8}
DEFAULT_VERSION = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e",
}


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
    reserved: bool = False
    valid_until: str | None = None  # gcloud duration, e.g. 6h: the queued request expires after it

    @property
    def nodes(self) -> list[str]:
        """TPU VM names: one per slice (a queued resource names them PREFIX-0, PREFIX-1, ...)."""
        return [f"{self.name}-{i}" for i in range(self.num_slices)] if self.num_slices > 1 else [self.name]

    @property
    def where(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}"]


def _generation(accelerator_type: str) -> tuple[str, int]:
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise LaunchError(f"--accelerator_type={accelerator_type!r} is not one of "
                          f"{', '.join(g + '-N' for g in DEVICES_PER_SUFFIX_UNIT)}")
    return match.group(1), int(match.group(2))


def num_devices(accelerator_type: str) -> int:
    """JAX devices of one slice of this accelerator type (e.g. v4-32 -> 16, v5litepod-16 -> 16)."""
    generation, size = _generation(accelerator_type)
    devices = size * DEVICES_PER_SUFFIX_UNIT[generation]
    if devices < 1 or devices != int(devices):
        raise LaunchError(f"--accelerator_type={accelerator_type!r} has no whole number of devices")
    return int(devices)


def num_hosts(accelerator_type: str) -> int:
    """TPU VM workers of one slice (e.g. v4-32 -> 4, v6e-8 -> 1)."""
    generation, _ = _generation(accelerator_type)
    devices = num_devices(accelerator_type)
    if devices <= SINGLE_HOST_UP_TO.get(generation, 0):
        return 1
    return max(1, devices // DEVICES_PER_HOST[generation])


def tpu_command(t: Tpu, words: list[str], *flags: str) -> list[str]:
    """`gcloud compute tpus WORDS --project=P --zone=Z FLAGS`."""
    return ["gcloud", "compute", "tpus", *words, *t.where, *flags]


def ssh(t: Tpu, node: str, remote: str, worker: str = "all") -> list[str]:
    return tpu_command(t, ["tpu-vm", "ssh", node], f"--worker={worker}", f"--command={remote}")


def create_commands(t: Tpu) -> list[list[str]]:
    version = t.version or DEFAULT_VERSION[t.accelerator_type.split("-")[0]]
    if not t.queued:
        return [tpu_command(t, ["tpu-vm", "create", t.name], f"--accelerator-type={t.accelerator_type}",
                            f"--version={version}", *(["--spot"] if t.spot else []),
                            *(["--preemptible"] if t.preemptible else []))]
    nodes = ([f"--node-count={t.num_slices}", f"--node-prefix={t.name}"] if t.num_slices > 1
             else [f"--node-id={t.name}"])
    return [tpu_command(t, ["queued-resources", "create", t.name], f"--accelerator-type={t.accelerator_type}",
                        f"--runtime-version={version}", *nodes, *(["--spot"] if t.spot else []),
                        *(["--reserved"] if t.reserved else []),
                        *([f"--valid-until-duration={t.valid_until}"] if t.valid_until else []))]


def describe_command(t: Tpu) -> list[str]:
    """The queued resource (state.state, state.failedData) or the TPU VM (state), as JSON."""
    kind = "queued-resources" if t.queued else "tpu-vm"
    return tpu_command(t, [kind, "describe", t.name], "--format=json")


def node_state_command(t: Tpu, node: str) -> list[str]:
    """One TPU VM's state: READY, PREEMPTED, TERMINATED, ... (a queued resource's VMs too)."""
    return tpu_command(t, ["tpu-vm", "describe", node], "--format=value(state)")


def delete_commands(t: Tpu) -> list[list[str]]:
    if t.queued:  # --force also deletes the TPU VMs the queued resource created.
        return [tpu_command(t, ["queued-resources", "delete", t.name], "--force", "--quiet")]
    return [tpu_command(t, ["tpu-vm", "delete", t.name], "--quiet")]


# ----------------------------------------------------------------------------- setup


def tarball_path(t: Tpu) -> str:
    return f"/tmp/gqlm-src-{t.name}.tar.gz"


def default_install(jax_version: str) -> str:
    return f'bash scripts/setup.sh && .venv/bin/pip install -q "jax[tpu]=={jax_version}"'


def setup_commands(t: Tpu, install: str) -> list[list[str]]:
    """Copy the packed working tree to every worker of every slice, unpack, run `install` in it."""
    remote = (f"set -e; mkdir -p ~/{t.remote_dir} && tar -xzf ~/gqlm-src.tar.gz -C ~/{t.remote_dir} && "
              f"cd ~/{t.remote_dir} && {install}")
    commands = []
    for node in t.nodes:
        commands.append(tpu_command(t, ["tpu-vm", "scp", tarball_path(t), f"{node}:gqlm-src.tar.gz"], "--worker=all"))
        commands.append(ssh(t, node, remote))
    return commands


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
