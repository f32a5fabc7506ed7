"""Validation-loss curves of short training runs, when a curve reaches a target, and the sweep's
learning-rate bracketing: the shared core of the optimizer benchmarks (optimizers.py,
optimizer_sweep.py). No flags here, so tests import it."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict
from gqlm.data.pipeline import make_eval_batches, make_train_iterator, to_global
from gqlm.train import state as state_lib
from gqlm.train.evaluation import evaluate
from gqlm.train.experiment import build_experiment, jit_eval_step, jit_train_step
from gqlm.train.tasks.lm import LMTask


def train_curve(config: ConfigDict, eval_every: int, eval_batches: int) -> dict[str, Any]:
    """Trains `config` from scratch; validation loss every `eval_every` steps on the first
    `eval_batches` validation batches, and the mean step time after the first (compiling) step."""
    exp = build_experiment(config, LMTask())
    cfg = exp.config
    step, sharding = jit_train_step(exp), mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
    eval_step = jit_eval_step(exp)
    batches = make_train_iterator(cfg, exp.tokenizer)
    held_out = make_eval_batches(cfg, exp.tokenizer, "validation", eval_batches)
    curve, train_seconds, start = [], 0.0, time.perf_counter()
    with jax.set_mesh(exp.mesh):
        state = state_lib.init_state(cfg.model, exp.tx, cfg.seed, exp.shardings)
        for i in range(1, cfg.train.steps + 1):
            batch = to_global(next(batches), sharding)
            tick = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics["loss"])
            train_seconds += (time.perf_counter() - tick) if i > 1 else 0.0
            if i % eval_every == 0 or i == cfg.train.steps:
                loss = evaluate(eval_step, state.params, held_out, exp.mesh, cfg.mesh.rules)["loss"]
                curve.append((i, float(loss)))
    return {"curve": curve, "final_loss": curve[-1][1], "seconds": time.perf_counter() - start,
            "step_time_s": train_seconds / max(cfg.train.steps - 1, 1),
            "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the curve reaches `target`, linear between evaluations; None if never."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            s0, l0 = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


FACTOR = 2.0  # between neighbouring learning rates of a sweep's grid


def best_rate(losses: dict[float, float]) -> float:
    """The rate with the lowest final loss; a non-finite loss (a diverged run) counts as worst."""
    return min(losses, key=lambda r: losses[r] if losses[r] == losses[r] else float("inf"))


def next_rate(losses: dict[float, float], max_rates: int) -> float | None:
    """The rate to try next: one step beyond the edge where the best final loss sits, or None
    once the best is inside the grid or the grid holds `max_rates` rates."""
    rates, best = sorted(losses), best_rate(losses)
    if len(rates) >= max_rates or rates[0] < best < rates[-1]:
        return None
    return rates[0] / FACTOR if best == rates[0] else rates[-1] * FACTOR


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and min-max of the values reached (None: never reached), and how many reached."""
    reached = [v for v in values if v is not None]
    if not reached:
        return {"mean": None, "min": None, "max": None, "reached": 0, "of": len(values)}
    return {"mean": statistics.fmean(reached), "min": min(reached), "max": max(reached),
            "reached": len(reached), "of": len(values)}


def cached_run(path: str, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The run stored under `key` in the JSON-lines file `path`, or `compute()`, appended there:
    a sweep stopped part way resumes where it stopped. A last line cut short by a kill is skipped."""
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("key") == key:
                    return row["run"]
    run = compute()
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        cut = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"  # a line cut short: start anew
        f.write(("\n" if cut else "").encode() + json.dumps({"key": key, "run": run}).encode() + b"\n")
    return run
