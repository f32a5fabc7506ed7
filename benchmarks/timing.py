"""Step timing for benchmarks: the real jitted train step of an experiment, on its mesh.

Warm-up steps (compilation, first-touch allocation) are excluded; the batches are assembled
before the clock starts, so the figure is device time per step, not input-pipeline time.
`TrainStepTimer` + `time_rounds` time several experiments round-robin in one process, so load
drift on a shared machine hits every case alike (each step is waited for: a queue of dozens of
asynchronously dispatched 8-device steps, in a process holding several compiled steps, has hung
XLA:CPU's in-process all-reduce rendezvous).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
from absl import app

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict
from gqlm.data.pipeline import make_train_iterator, to_global
from gqlm.models.flops import flops_per_token
from gqlm.train import state as state_lib
from gqlm.train.experiment import build_experiment, jit_train_step
from gqlm.train.tasks.lm import LMTask


def time_train_steps(config: ConfigDict, steps: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per train step, tokens/s and model FLOP/s of `config` (after `warmup` steps),
    the steps dispatched without waiting, as training runs them."""
    timer = TrainStepTimer(config, steps + warmup)
    # Compilation; SOAP's first call only builds its statistics.
    warmup_seconds = timer.run(warmup, wait_each_step=False) * warmup
    seconds = timer.run(steps, wait_each_step=False)
    cfg = timer.exp.config
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    return {"step_time_s": seconds, "warmup_s": warmup_seconds, "tokens_per_s": timer.tokens / seconds,
            "tokens_per_step": timer.tokens,
            "flops_per_token": flops, "model_flops_per_s": timer.tokens / seconds * flops,
            "final_loss": float(timer.metrics["loss"])}


class TrainStepTimer:
    """An experiment's jitted train step on its mesh, with its state and `num_batches` batches."""

    def __init__(self, config: ConfigDict, num_batches: int):
        self.exp = exp = build_experiment(config, LMTask())
        cfg = exp.config
        self.tokens = cfg.data.batch_size * cfg.data.seq_len
        batches = make_train_iterator(cfg, exp.tokenizer)
        sharding = mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
        with jax.set_mesh(exp.mesh):
            self.state = state_lib.init_state(cfg.model, exp.tx, cfg.seed, exp.shardings)
            self.step = jit_train_step(exp)
            self.data = [to_global(next(batches), sharding) for _ in range(num_batches)]
        self.metrics: dict[str, Any] = {}
        self._next_batch = 0

    def run(self, steps: int, wait_each_step: bool = True) -> float:
        """Seconds per step over `steps` steps (the state trains on, through the batches in turn);
        each step is waited for unless `wait_each_step` is False."""
        with jax.set_mesh(self.exp.mesh):
            start = time.perf_counter()
            for _ in range(steps):
                batch = self.data[self._next_batch % len(self.data)]
                self._next_batch += 1
                self.state, self.metrics = self.step(self.state, batch)
                if wait_each_step:
                    jax.block_until_ready(self.metrics)
            jax.block_until_ready(self.metrics)
        return (time.perf_counter() - start) / steps

    def restart_from(self, state: Any) -> None:
        """Continue from `state` (a host copy of the same model's TrainState), on this mesh."""
        self.state = jax.device_put(state, self.exp.shardings)
        self.run(1)


def time_rounds(timers: Sequence[Any], steps: int, rounds: int) -> list[list[float]]:
    """Seconds per step of each timer (anything with `run(steps) -> seconds per step`, like
    `TrainStepTimer`) in each round, every timer `steps` steps per round."""
    times: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            times[i].append(timer.run(steps))
    return times


def time_alternating(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """What each case's callable returns (e.g. the seconds it measured), over `rounds` rounds, the
    order reversed every other round (AB, BA, AB, ...): whatever running first or second costs
    (a cold file cache, allocations, load drift) falls on every case alike."""
    names = list(cases)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(cases[name]())
    return results


def parse_mesh(text: str) -> tuple[int, int, int]:
    """A benchmark's `--meshes` entry DATAxFSDPxTENSOR (e.g. 1x8x1); a usage error otherwise."""
    mesh = tuple(int(x) for x in text.split("x")) if text.replace("x", "").isdigit() else ()
    if len(mesh) != 3:
        raise app.UsageError(f"--meshes entry {text!r} is not DATAxFSDPxTENSOR")
    return mesh


def mesh_overrides(mesh: tuple[int, int, int]) -> dict[str, str]:
    """Config overrides putting an experiment on the (data, fsdp, tensor) mesh."""
    return {f"mesh.{axis}": str(size) for axis, size in zip(("data", "fsdp", "tensor"), mesh)}


def code_version() -> str:
    """The commit the benchmark ran at (`git describe`), "-dirty" when the tree had changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(path: str, results: dict[str, Any]) -> None:
    """A benchmark's JSON results (the folder is created), labelled with the commit and date
    they were measured at, so a figure in the docs can name the code behind it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    results = {"commit": code_version(), "date": time.strftime("%Y-%m-%d"), **results}
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
