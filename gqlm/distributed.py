"""Multi-process start-up: `maybe_initialize()` joins the processes of one job before any jax call.

Where the processes come from decides how they find each other:
- gqlm's own variables (launch/local.py, launch/multinode.py, any hand-made multi-node job):
  GQLM_COORDINATOR_ADDRESS=host:port, GQLM_NUM_PROCESSES=N, GQLM_PROCESS_ID=i, optionally
  GQLM_LOCAL_DEVICE_IDS=0,1 (GPUs this process drives; default all of the node's);
- Slurm (`srun` with several tasks): jax's own Slurm detection, one process per GPU;
- TPU VMs (pods, multi-slice via queued resources, GKE): jax's own TPU detection.
GQLM_DISTRIBUTED=auto forces jax's auto-detection, =off disables all of this; GQLM_INIT_TIMEOUT
(seconds, default 300) bounds the wait for the other processes.

jax aborts the whole process (LOG(FATAL)) when the coordinator cannot be reached in time, so we
check reachability ourselves first (a ConfigError naming the address) and keep a watchdog that
ends the process with one line if the rendezvous still does not complete.

gloo (the CPU collectives) advertises the address this machine's hostname resolves to, which on
many hosts is unreachable (a container's odd /etc/hosts, a NAT address). With gqlm's variables we
advertise instead the local address of the route to the coordinator: the one the others can reach.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from gqlm.config import ConfigError

ENV_COORDINATOR = "GQLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "GQLM_NUM_PROCESSES"
ENV_PROCESS_ID = "GQLM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "GQLM_LOCAL_DEVICE_IDS"
ENV_MODE = "GQLM_DISTRIBUTED"
ENV_TIMEOUT = "GQLM_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_WATCHDOG_GRACE_S = 30  # jax's own deadline is set this much later, so our clear message comes first


class Plan(NamedTuple):
    """How this process joins the job. kind: 'gqlm' (explicit), 'slurm' or 'tpu' (jax detects)."""
    kind: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ConfigError(f"{name} is not set but {ENV_COORDINATOR} is; set all of "
                          f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}") from None
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} must be an integer") from None


def _on_tpu_vm() -> bool:
    """TPU chips present (v2-v4 show /dev/accel*, v5+ /dev/vfio/N) and libtpu installed."""
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def detect(env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None) -> Plan | None:
    """The plan the environment asks for, or None for a single process."""
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"{ENV_MODE}={env[ENV_MODE]!r} must be auto, off or unset")
    if mode == "off":
        return None
    timeout = env.get(ENV_TIMEOUT, "").strip()
    try:  # checked here: a bad value would otherwise be a raw ValueError in maybe_initialize
        if timeout and not float(timeout) > 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{ENV_TIMEOUT}={env[ENV_TIMEOUT]!r} must be a positive number of seconds") from None
    if env.get(ENV_COORDINATOR):
        address = env[ENV_COORDINATOR]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{ENV_COORDINATOR}={address!r} must have the form host:port")
        n, i = _int_var(env, ENV_NUM_PROCESSES), _int_var(env, ENV_PROCESS_ID)
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"{ENV_PROCESS_ID}={i} must lie in [0, {ENV_NUM_PROCESSES}={n})")
        ids = env.get(ENV_LOCAL_DEVICE_IDS, "").strip()
        try:
            local = tuple(int(x) for x in ids.split(",")) if ids else None
        except ValueError:
            raise ConfigError(f"{ENV_LOCAL_DEVICE_IDS}={ids!r} must be a comma list of integers") from None
        return Plan("gqlm", address, n, i, local) if n > 1 else None
    if all(v in env for v in _SLURM_VARS) and _int_var(env, "SLURM_NTASKS") > 1:
        return Plan("slurm")
    if mode == "auto":
        return Plan("tpu" if (on_tpu_vm if on_tpu_vm is not None else _on_tpu_vm()) else "auto")
    multislice_or_gke = "MEGASCALE_COORDINATOR_ADDRESS" in env or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if multislice_or_gke or (on_tpu_vm if on_tpu_vm is not None else _on_tpu_vm()):
        return Plan("tpu")
    return None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls a TCP connect to `address` until it answers; ConfigError naming it after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"coordinator {address} ({ENV_COORDINATOR}) unreachable after {timeout_s:g} s: {e}; "
                    f"is process 0 running and the port open?") from None
            time.sleep(0.2)


def route_address(address: str) -> str | None:
    """This host's address on the route to `address` (host:port), or None when there is no route.

    A UDP socket's connect only looks up the route (no packet is sent), so this is instant.
    """
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, target = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(target)
            return probe.getsockname()[0]
    except OSError:
        return None


def _advertise_gloo_address(hostname: str) -> None:
    """Makes the CPU backend's gloo collectives advertise `hostname` (jax has no public option)."""
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    if xla_bridge.backends_are_initialized():
        return  # too late: jax.distributed.initialize raises its own error for this

    def make_cpu_client():  # called lazily, after jax.distributed.initialize made the client
        collectives = _jax.make_gloo_tcp_collectives(jax_distributed.global_state.client, hostname=hostname)
        return xla_bridge.make_cpu_client(collectives)

    xla_bridge.register_backend_factory("cpu", make_cpu_client, priority=0, fail_quietly=False)


def _describe(plan: Plan) -> str:
    if plan.kind == "gqlm":
        return f"coordinator {plan.coordinator} ({ENV_COORDINATOR}) with {plan.num_processes} processes"
    if plan.kind == "slurm":
        return (f"Slurm coordinator (first node of {os.environ.get('SLURM_STEP_NODELIST')}) with "
                f"{os.environ.get('SLURM_NTASKS')} tasks")
    return "coordinator found by jax's auto-detection"


def _start_watchdog(seconds: float, plan: Plan) -> threading.Timer:
    def fire() -> None:  # jax would abort with a C++ stack trace; end with one line instead.
        print(f"gqlm: error: the {_describe(plan)} did not complete the start-up within {seconds:g} s "
              f"({ENV_TIMEOUT}); did every process start?", file=sys.stderr, flush=True)
        os._exit(2)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def maybe_initialize(initialization_timeout: float | None = None) -> None:
    """Calls `jax.distributed.initialize` when this is one of several processes; else nothing.

    Must run before any other jax call (it configures the CPU collectives and the backends).
    """
    plan = detect()
    if plan is None:
        return
    import jax

    if jax.distributed.is_initialized():
        return
    timeout = float(initialization_timeout or os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
    # CPU collectives across processes need gloo (the default does none); harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if plan.kind == "gqlm" and (hostname := route_address(plan.coordinator)):
        _advertise_gloo_address(hostname)
    start = time.monotonic()
    if plan.kind == "gqlm" and plan.process_id != 0:
        wait_for_coordinator(plan.coordinator, timeout)
    remaining = max(1.0, timeout - (time.monotonic() - start))
    watchdog = _start_watchdog(remaining, plan)
    try:
        if plan.kind == "gqlm":  # explicit: jax's Slurm/MPI detection would pick one GPU per process
            jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id,
                                       local_device_ids=list(plan.local_device_ids or []) or None,
                                       cluster_detection_method="deactivate",
                                       initialization_timeout=int(remaining) + _WATCHDOG_GRACE_S)
        else:
            jax.distributed.initialize(initialization_timeout=int(remaining) + _WATCHDOG_GRACE_S)
    except (ValueError, RuntimeError) as e:  # e.g. the port is taken, or auto-detection found nothing
        raise ConfigError(f"jax.distributed.initialize failed for the {_describe(plan)}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        watchdog.cancel()


# ----------------------------------------------------------------------------- multi-slice meshes


def multislice_device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
    """Devices for a (data, fsdp, tensor, expert) mesh spanning several TPU slices, or None.

    The `data` axis is the only one that crosses slices (data-center network, DCN): each slice
    holds `data / num_slices` rows of it, and fsdp/tensor/expert stay inside one slice (ICI).
    None when all devices sit in one slice (use `jax.make_mesh`).
    """
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) <= 1:
        return None
    from jax.experimental import mesh_utils

    n = len(slices)
    if shape[0] % n:
        raise ConfigError(f"mesh.data={shape[0]} must be a multiple of the {n} TPU slices "
                          "(data parallelism is the axis that spans slices)")
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh shape {tuple(shape)} does not match the {len(devices)} devices of {n} slices")
    ici = (shape[0] // n, *shape[1:])
    dcn = (n,) + (1,) * (len(shape) - 1)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
