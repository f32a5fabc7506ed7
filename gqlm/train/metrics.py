"""Metric sinks (tensorboard, JSON lines, console) and FLOPs / MFU accounting.

Only process 0 writes; every other process gets a writer that drops everything.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

# Dense bf16 peak FLOP/s per device, from vendor datasheets, keyed by a substring of device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6": 918e12, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
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
    """The datasheet's dense bf16 FLOP/s of one device of this kind, or None if unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None)


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


class MetricWriter:
    """Writes scalars to tensorboard and `metrics.jsonl` in the workdir (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        root = epath.Path(workdir)  # Local paths and gs:// buckets alike (pod workdirs).
        root.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(root / "tensorboard"))
        self.jsonl = (root / "metrics.jsonl").open("a")

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        for k, v in scalars.items():
            self.tensorboard.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
            self.jsonl.close()


class Throughput:
    """Tokens/s, MFU and the fraction of wall time spent waiting for data, over the steps since
    the last call."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * jax.device_count() if peak_flops else None
        self.last_time, self.last_step, self.data_wait = time.perf_counter(), None, 0.0

    def next_batch(self, iterator: Any) -> Any:
        """`next(iterator)`, timed: the host's wait for the input pipeline."""
        start = time.perf_counter()
        batch = next(iterator)
        self.data_wait += time.perf_counter() - start
        return batch

    def __call__(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        out = {}
        if self.last_step is not None and step > self.last_step:
            seconds = (now - self.last_time) / (step - self.last_step)
            tokens_per_s = self.tokens_per_step / seconds
            out = {"step_time_s": seconds, "tokens_per_s": tokens_per_s,
                   "data_wait_fraction": self.data_wait / max(now - self.last_time, 1e-9)}
            if self.peak_total:
                out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_total
        self.last_time, self.last_step, self.data_wait = now, step, 0.0
        return out
