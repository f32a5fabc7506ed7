"""Tuned optimizers, compared: every optimizer's best rate bracketed inside its grid, several seeds,
two batch sizes, steps and seconds to a common target.

    PYTHONPATH=. python benchmarks/optimizer_sweep.py [--optimizers adamw,soap,lion,...]
        [--tokens_per_step 8192,32768] [--seeds 0,1,2] [--train_steps 120] [--set KEY=VALUE ...]

The model and data are `experiments/soap_vs_adamw.py`'s (byte-level d128 x 4 on Shakespeare): the
hidden matrices (attention and MLP weights) get the optimizer under test, the embedding/head and
the norm scales keep AdamW at the experiment's rate (3e-3) in every arm, and only the hidden
group's rate is tuned (its `lr_multiplier`). Same warm-up and cosine decay, the same token budget
per batch size (`--train_steps` x tokens per step).

Per batch size:
1. Tune on the first seed: start from the optimizer's grid (GRIDS, a factor FACTOR = 2 apart); while the
   best final validation loss sits at an edge of the grid, add the next rate beyond that edge (at
   most --max_extend times). A best rate still at an edge is reported as not bracketed.
2. Run the best rate on the other seeds (init and data order follow `config.seed`).
3. Target: AdamW's mean final validation loss over the seeds. Per seed, steps to reach it (linear
   between evaluations); mean and min-max spread.
4. Seconds to target: steps to target x the optimizer's step time, timed round-robin over all
   optimizers at their best rates (`--time_rounds` rounds of `--time_steps` steps, after two
   warm-up steps), so load drift on a shared machine hits every optimizer alike; each run's own
   mean step time (timed alone, whatever else ran then) is kept in the JSON too.
Every finished run is appended to `--cache` (JSON lines) and reused by a later invocation with the
same settings, so an interrupted sweep resumes where it stopped.
Runs on one CPU device by default (the comparison does not depend on the mesh; 8 fake devices
only add collective overhead). Prints the table; writes JSON and a PNG (final loss against rate).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # SOAP's eigh under XLA:CPU (see optimizers.py)

import json  # noqa: E402
import statistics  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from absl import app, flags  # noqa: E402

from curves import FACTOR, best_rate, cached_run, next_rate, spread, steps_to_reach, train_curve  # noqa: E402
from gqlm import config as config_lib  # noqa: E402
from timing import TrainStepTimer, time_rounds, write_results  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OTHER_LR = 3e-3  # the AdamW group (embedding/head, norms) in every arm
GRIDS = {  # starting grids of the hidden group's rate; extended until the best is inside
    "adamw": (1.5e-3, 3e-3, 6e-3), "soap": (3e-3, 6e-3, 1.2e-2), "adalayer": (1.5e-3, 3e-3, 6e-3),
    "adafactor": (3e-3, 6e-3, 1.2e-2), "lion": (1.5e-4, 3e-4, 6e-4), "signum": (1.5e-4, 3e-4, 6e-4),
    "sgd": (0.1, 0.2, 0.4),
}

flags.DEFINE_list("optimizers", list(GRIDS), "Optimizers of the hidden matrices (AdamW is always run).")
flags.DEFINE_list("tokens_per_step", ["8192", "32768"], "Batch sizes in tokens (rows of data.seq_len).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed of each run; the first one tunes.")
flags.DEFINE_integer("train_steps", 120, "Steps per run.")
flags.DEFINE_integer("eval_every", 20, "Steps between validation evaluations.")
flags.DEFINE_integer("eval_batches", 8, "Validation batches per evaluation.")
flags.DEFINE_integer("max_extend", 3, "Rates added beyond a grid edge at most.")
flags.DEFINE_multi_string("set", [], "Extra config overrides KEY=VALUE (e.g. model.num_layers=2 for a quick run).")
flags.DEFINE_integer("time_steps", 10, "Steps per round of the round-robin step timing (0: skip it).")
flags.DEFINE_integer("time_rounds", 3, "Rounds of the round-robin step timing.")
flags.DEFINE_string("out", "benchmarks/results/optimizer_sweep.json", "JSON output (PNG next to it).")
flags.DEFINE_string("cache", "/tmp/gqlm_optimizer_sweep_runs.jsonl", "Finished runs (JSON lines), reused on rerun.")
FLAGS = flags.FLAGS


def run_config(optimizer: str, lr: float, tokens: int, seed: int) -> config_lib.ConfigDict:
    """experiments/soap_vs_adamw.py with `optimizer` at rate `lr` on the hidden matrices."""
    config = config_lib.load_experiment(os.path.join(ROOT, f"experiments/soap_vs_adamw.py:adamw,lr={OTHER_LR}"))
    extra = dict(item.split("=", 1) for item in FLAGS.set)
    config = config_lib.apply_override_strings(config, {
        "mesh.data": "1", "train.steps": str(FLAGS.train_steps),
        "optimizer.warmup_steps": str(max(1, FLAGS.train_steps // 10)), "seed": str(seed), **extra})
    rows, remainder = divmod(tokens, config.data.seq_len)
    if remainder or rows < 1:
        raise app.UsageError(f"--tokens_per_step {tokens} is not a multiple of data.seq_len={config.data.seq_len}")
    config.data.batch_size = rows
    (group,) = config.optimizer.groups
    config.optimizer.groups = ({**group, "optimizer": optimizer, "lr_multiplier": lr / OTHER_LR},)
    return config


def tune(optimizer: str, tokens: int, seed: int) -> tuple[dict[float, dict], float, bool]:
    """({rate: run}, best rate, whether the best is inside the grid) on one seed."""
    runs = {rate: measured(optimizer, rate, tokens, seed) for rate in GRIDS[optimizer]}
    losses = lambda: {r: x["final_loss"] for r, x in runs.items()}  # noqa: E731
    while (rate := next_rate(losses(), len(GRIDS[optimizer]) + FLAGS.max_extend)) is not None:
        runs[rate] = measured(optimizer, rate, tokens, seed)
    rates, best = sorted(runs), best_rate(losses())
    return runs, best, rates[0] < best < rates[-1]


def run_key(optimizer: str, lr: float, tokens: int, seed: int) -> str:
    """What identifies a run in the cache: its arm and every setting its curve depends on."""
    return json.dumps([optimizer, lr, tokens, seed, FLAGS.train_steps, FLAGS.eval_every, FLAGS.eval_batches,
                       sorted(FLAGS.set)])


def measured(optimizer: str, lr: float, tokens: int, seed: int) -> dict[str, Any]:
    run = cached_run(FLAGS.cache, run_key(optimizer, lr, tokens, seed), lambda: train_curve(
        run_config(optimizer, lr, tokens, seed), FLAGS.eval_every, FLAGS.eval_batches))
    print(f"{tokens} tokens/step, {optimizer} lr={lr:g} seed={seed}: final validation loss "
          f"{run['final_loss']:.4f} ({run['seconds']:.0f} s)", flush=True)
    return {"optimizer": optimizer, "lr": lr, "seed": seed, **run}


def sweep_batch_size(tokens: int, seeds: list[int]) -> dict[str, Any]:
    arms = {}
    for optimizer in ["adamw"] + [o for o in FLAGS.optimizers if o != "adamw"]:
        tuning, best, bracketed = tune(optimizer, tokens, seeds[0])
        finals = [tuning[best]] + [measured(optimizer, best, tokens, s) for s in seeds[1:]]
        arms[optimizer] = {"tuning": list(tuning.values()), "best_lr": best, "bracketed": bracketed, "seeds": finals}
    target = statistics.fmean(r["final_loss"] for r in arms["adamw"]["seeds"])
    step_times = round_robin_step_times({name: arm["best_lr"] for name, arm in arms.items()}, tokens, seeds[0])
    for name, arm in arms.items():
        steps = [steps_to_reach(r["curve"], target) for r in arm["seeds"]]
        arm["final_loss"] = spread([r["final_loss"] for r in arm["seeds"]])
        arm["steps_to_target"] = spread(steps)
        arm["step_time_s"] = step_times.get(name)
        arm["seconds_to_target"] = spread([None if s is None or name not in step_times else s * step_times[name]
                                           for s in steps])
    return {"tokens_per_step": tokens, "target_loss": target, "arms": arms}


def round_robin_step_times(best_lrs: dict[str, float], tokens: int, seed: int) -> dict[str, float]:
    """Each optimizer's seconds per step at its best rate, median over rounds timed round-robin."""
    if FLAGS.time_steps <= 0:
        return {}
    timers = {name: TrainStepTimer(run_config(name, lr, tokens, seed), FLAGS.time_steps)
              for name, lr in best_lrs.items()}
    for timer in timers.values():
        timer.run(2)  # compilation; SOAP's statistics-only first call
    rounds = time_rounds(list(timers.values()), FLAGS.time_steps, FLAGS.time_rounds)
    return {name: statistics.median(times) for name, times in zip(timers, rounds)}


def fmt(stat: dict[str, Any], digits: int = 0) -> str:
    if stat["mean"] is None:
        return f"not reached (0/{stat['of']})"
    text = f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"
    return text if stat["reached"] == stat["of"] else f"{text} ({stat['reached']}/{stat['of']})"


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['tokens_per_step']} tokens/step, target {result['target_loss']:.4f} nats/byte "
             "(AdamW's mean final validation loss); mean [min, max] over seeds:", "",
             "| optimizer | best lr | bracketed | final val loss | steps to target | s/step | seconds to target |",
             "|---|---|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['best_lr']:g} | {'yes' if arm['bracketed'] else 'NO'} | "
                     f"{fmt(arm['final_loss'], 4)} | {fmt(arm['steps_to_target'])} | "
                     f"{'-' if arm['step_time_s'] is None else format(arm['step_time_s'], '.3f')} | "
                     f"{fmt(arm['seconds_to_target'], 1)} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        for name, arm in result["arms"].items():
            points = sorted((r["lr"], r["final_loss"]) for r in arm["tuning"])
            ax.plot(*zip(*points), marker="o", label=name)
        ax.axhline(result["target_loss"], color="gray", linestyle=":", label="target")
        ax.set(xscale="log", xlabel="learning rate (hidden matrices)", ylabel="final validation loss",
               title=f"{result['tokens_per_step']} tokens/step (first seed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    unknown = [o for o in FLAGS.optimizers if o not in GRIDS]
    if unknown:
        raise app.UsageError(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(GRIDS)})")
    if any("=" not in item for item in FLAGS.set):
        raise app.UsageError(f"--set entries must be KEY=VALUE, got {FLAGS.set}")
    seeds = [int(s) for s in FLAGS.seeds]
    results = [sweep_batch_size(int(t), seeds) for t in FLAGS.tokens_per_step]
    for result in results:
        print(table(result) + "\n")
    write_results(FLAGS.out, {"experiment": "experiments/soap_vs_adamw.py", "overrides": FLAGS.set,
                              "train_steps": FLAGS.train_steps, "eval_every": FLAGS.eval_every,
                              "eval_batches": FLAGS.eval_batches, "seeds": seeds, "results": results})
    plot(results, os.path.splitext(FLAGS.out)[0] + ".png")


if __name__ == "__main__":
    app.run(main)
