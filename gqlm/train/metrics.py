"""Metric sinks (tensorboard, JSON lines, Weights & Biases) and throughput accounting: tokens/s,
MFU, the host's wait for data and for checkpoints.

Only process 0 writes; every other process gets a writer that drops everything.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gqlm.config import ConfigDict
from gqlm.train.wandb_sink import WandbSink

T = TypeVar("T")

# Dense (no sparsity) bf16 peak FLOP/s per device from vendor datasheets, keyed by a substring of
# jax's device_kind ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe", "TPU v5 lite" is
# v5e, "TPU v5" v5p, "TPU v6 lite" v6e); the longest key found wins ("H100 PCIe" over "H100").
PEAK_FLOPS = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,  # the bare key: SXM
    "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12,
    "A100": 312e12, "L4": 121e12, "L40": 181e12, "L40S": 362e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def device_peak_flops(override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override, the datasheet, or (CPU) a matmul measured now."""
    if override:
        return override
    known = datasheet_peak_flops(jax.devices()[0].device_kind)
    if known is None and jax.devices()[0].platform == "cpu":
        return measure_matmul_peak(n=1024, repeats=3) / jax.device_count()
    return known


def datasheet_peak_flops(device_kind: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of one device of this kind, or None if unknown. Keys
    match case-insensitively, the longest found winning ("H100 PCIe" over "H100", "L40S" over "L4")."""
    found = [k for k in PEAK_FLOPS if k.lower() in device_kind.lower()]
    return PEAK_FLOPS[max(found, key=len)] if found else None


def measure_matmul_peak(n: int = 2048, repeats: int = 10, dtype: Any = jnp.float32) -> float:
    """FLOP/s of a [n*devices, n] x [n, n] matmul in `dtype` with rows sharded over all local
    devices (random operands: constant ones can run faster than real data on GPUs)."""
    mesh = jax.make_mesh((jax.local_device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.local_devices())
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n * jax.local_device_count(), n), dtype),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    b = jax.random.normal(key_b, (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a, b).block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * n * n * n * jax.local_device_count() / seconds


def tensorboard_dir(workdir: str) -> str:
    """Where tensorboard's scalars and the profiler's traces go (`tensorboard --logdir` this)."""
    return str(epath.Path(workdir) / "tensorboard")


class TensorboardSink:
    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(tensorboard_dir(workdir))

    def write(self, step: int, prefix: str, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class JsonlSink:
    """One JSON line per write: {"step", "split" (the prefix), scalars...}."""

    def __init__(self, workdir: str):
        self.file = (epath.Path(workdir) / "metrics.jsonl").open("a")

    def write(self, step: int, prefix: str, scalars: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricWriter:
    """Writes scalars to tensorboard and `metrics.jsonl` in the workdir, and to Weights & Biases when
    `config.train.wandb_project` is set (process 0 only)."""

    def __init__(self, workdir: str, config: ConfigDict | None = None):
        self.sinks = []
        if jax.process_index() != 0:
            return
        if config is not None and config.train.wandb_project:  # First: a missing wandb fails before any file.
            self.sinks.append(WandbSink(workdir, config))
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local paths and gs:// buckets alike.
        self.sinks += [TensorboardSink(workdir), JsonlSink(workdir)]

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.sinks:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        for sink in self.sinks:
            sink.write(step, prefix, scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Throughput:
    """Tokens/s, MFU, and the host's waits over the steps since the last call: for data (per step
    and as a fraction of wall time) and inside checkpoint calls (the part of an async save that
    blocks the loop)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * jax.device_count() if peak_flops else None
        self.last_time, self.last_step, self.data_wait = time.perf_counter(), None, 0.0
        self.checkpoint_block = self.checkpoint_block_total = 0.0

    def next_batch(self, iterator: Any) -> Any:
        """`next(iterator)`, timed: the host's wait for the input pipeline."""
        start = time.perf_counter()
        batch = next(iterator)
        self.data_wait += time.perf_counter() - start
        return batch

    def time_checkpoints(self, call: Callable[..., T]) -> Callable[..., T]:
        """`call` (a checkpoint save or wait), timed: how long it holds up the loop."""
        @functools.wraps(call)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self.checkpoint_block += seconds
                self.checkpoint_block_total += seconds
        return timed

    def __call__(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        out = {}
        if self.last_step is not None and step > self.last_step:
            seconds = (now - self.last_time) / (step - self.last_step)
            tokens_per_s = self.tokens_per_step / seconds
            out = {"step_time_s": seconds, "tokens_per_s": tokens_per_s,
                   "data_wait_s": self.data_wait / (step - self.last_step),
                   "data_wait_fraction": self.data_wait / max(now - self.last_time, 1e-9),
                   "checkpoint_block_s": self.checkpoint_block}
            if self.peak_total:
                out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_total
        self.last_time, self.last_step, self.data_wait, self.checkpoint_block = now, step, 0.0, 0.0
        return out
