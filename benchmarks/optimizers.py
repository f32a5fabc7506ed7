"""Optimizer benchmarks: (a) step time as a ratio to AdamW, (b) SOAP's steps to AdamW's final loss.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/optimizers.py --part=all

(a) `--part=step_time`: the 4-layer d512 model (`experiments/dense.py:d512`, Shakespeare bytes,
    `--seq_len` x `--batch_size` tokens per step) on each mesh of `--meshes`. SOAP's extra work per
    step is ~8 m n (m + n) FLOPs per m x n matrix (Gram statistics; projecting the gradient and
    first moment; projecting back) against 6 m n per token for the model, so its
    overhead shrinks as (m + n) / tokens per step: 8,192 tokens is still a small pretraining batch.
    On the fsdp mesh the optimizer state and its linear algebra are split over the 8 devices; on
    the data mesh too (SOAP's state and its per-step math are split over every device whatever
    the parameter's sharding). `--experiment` and `--set KEY=VALUE` pick another model (e.g. on one
    GPU: `--experiment=experiments/dense_125m.py --meshes=1x1x1 --seq_len=1024 --batch_size=32
    --set=model.compute_dtype=bfloat16`). Every optimizer's step is built and run twice first (compilation,
    and SOAP's statistics-only first call); then all are timed round-robin, `--rounds` rounds of
    `--steps` consecutive steps each (a multiple of the refresh period, so SOAP's eigenbasis
    refreshes are averaged in), so load drift on a shared machine hits every optimizer alike.
    A step time is the best round's mean (the median round's ratio is reported too).
(b) `--part=steps_to_target`: `experiments/soap_vs_adamw.py` (tiny d128 x 4 model, SOAP on the
    hidden matrices, AdamW elsewhere) for each learning rate of its `SWEEP` (or `--lrs`), the
    same token budget (`--train_steps` x 32 x 128 tokens) for every run; validation loss every
    `--eval_every` steps on the first `--eval_batches` validation batches. Each arm's best rate
    is the one with the lowest final validation loss; the target is AdamW's best final loss;
    "steps to target" is the first step at which a curve reaches it (linearly interpolated
    between evaluations).

`--max_precond_block=N[,M...]` adds an arm per size to both parts: SOAP with its block-diagonal
preconditioner (`optimizer.max_precond_block=N`), labelled `soap_blockN`, timed in the same
round-robin and trained on the same sweep; (b) then also reports its steps to the target over
unblocked SOAP's (best rates each). `--adamw_lrs` gives AdamW other rates than the
SOAP arms' `--lrs`.

Writes benchmarks/results/optimizers.json (parts run separately are merged into it) and
benchmarks/results/optimizers.png (validation-loss curves), and prints markdown tables.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set
# XLA:CPU runs eigh/QR through scipy's OpenBLAS-backed LAPACK; with its default thread pool the 8
# fake devices' concurrent calls thrash (a 512x512 eigh: 4.5 s instead of 0.014 s on 2 cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm import mesh as mesh_lib  # noqa: E402
from gqlm.data.pipeline import make_eval_batches, make_train_iterator, to_global  # noqa: E402
from gqlm.train.evaluation import evaluate  # noqa: E402
from gqlm.train import state as state_lib  # noqa: E402
from gqlm.train.experiment import build_experiment, jit_eval_step, jit_train_step  # noqa: E402
from gqlm.train.tasks.lm import LMTask  # noqa: E402
from curves import steps_to_reach  # noqa: E402
from timing import TrainStepTimer, mesh_overrides, parse_mesh, time_rounds, write_results  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ZOO = ("adamw", "lion", "signum", "adafactor", "sgd", "adalayer", "soap")

flags.DEFINE_enum("part", "all", ["step_time", "steps_to_target", "all"], "Which benchmark to run.")
flags.DEFINE_list("optimizers", list(ZOO), "(a) optimizers to time (AdamW is always timed, first and last).")
flags.DEFINE_list("meshes", ["1x8x1", "8x1x1"], "(a) meshes as DATAxFSDPxTENSOR, e.g. 8x1x1,1x8x1.")
flags.DEFINE_integer("seq_len", 512, "(a) sequence length.")
flags.DEFINE_integer("batch_size", 16, "(a) global batch size (sequences).")
flags.DEFINE_string("experiment", "experiments/dense.py:d512", "(a) the model's experiment file[:variant].")
flags.DEFINE_multi_string("set", [], "(a) extra config overrides KEY=VALUE (e.g. model.compute_dtype=bfloat16).")
flags.DEFINE_integer("steps", 10, "(a) timed steps per optimizer per round (a multiple of 10, SOAP's refresh period).")
flags.DEFINE_integer("rounds", 3, "(a) round-robin timing rounds (the best round counts).")
flags.DEFINE_integer("train_steps", 120, "(b) steps per run (the token budget).")
flags.DEFINE_integer("eval_every", 20, "(b) steps between validation evaluations.")
flags.DEFINE_integer("eval_batches", 4, "(b) validation batches per evaluation.")
flags.DEFINE_list("lrs", [], "(b) learning rates for every arm; empty: experiments/soap_vs_adamw.py SWEEP.")
flags.DEFINE_list("adamw_lrs", [], "(b) AdamW's learning rates, if other than --lrs.")
flags.DEFINE_list("max_precond_block", [], "(a, b) block sizes: a blocked SOAP arm soap_block<N> for each.")
flags.DEFINE_string("out", "benchmarks/results/optimizers.json", "JSON output (PNG next to it).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- (a) step time


BLOCKED = "soap_block"  # label prefix of the blocked SOAP arms


def blocked_arms() -> list[str]:
    """soap_block<N> for each N of --max_precond_block (a usage error unless a positive integer)."""
    if not all(n.isdigit() and int(n) > 0 for n in FLAGS.max_precond_block):
        raise app.UsageError(f"--max_precond_block takes positive integers, got {FLAGS.max_precond_block}")
    return [f"{BLOCKED}{int(n)}" for n in FLAGS.max_precond_block]


def arm_overrides(name: str) -> dict[str, str]:
    """Config overrides of an arm: a zoo optimizer, or soap_block<N> (SOAP, max_precond_block=N)."""
    if name.startswith(BLOCKED):
        return {"optimizer.name": "soap", "optimizer.max_precond_block": name[len(BLOCKED):]}
    return {"optimizer.name": name}


def optimizer_config(name: str, mesh: tuple[int, int, int]) -> config_lib.ConfigDict:
    """The `--experiment` model with optimizer arm `name` on `mesh` (data, fsdp, tensor)."""
    config = config_lib.load_experiment(os.path.join(ROOT, FLAGS.experiment))
    extra = dict(item.split("=", 1) for item in FLAGS.set if "=" in item)
    if len(extra) != len(FLAGS.set):
        raise app.UsageError(f"--set entries must be KEY=VALUE, got {FLAGS.set}")
    return config_lib.apply_override_strings(config, {
        "data.corpus": "shakespeare", "data.seq_len": str(FLAGS.seq_len), "data.batch_size": str(FLAGS.batch_size),
        **mesh_overrides(mesh), **arm_overrides(name), "optimizer.warmup_steps": "1",
        "optimizer.precondition_frequency": "10", **extra})


def run_step_time() -> dict[str, Any]:
    names = [n for n in FLAGS.optimizers if n != "adamw"]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise app.UsageError(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(ZOO)})")
    names += blocked_arms()
    result = {"model": FLAGS.experiment, "overrides": FLAGS.set, "seq_len": FLAGS.seq_len, "batch_size": FLAGS.batch_size,
              "steps": FLAGS.steps, "rounds": FLAGS.rounds, "precondition_frequency": 10,
              "meshes": {}}
    for mesh_text in FLAGS.meshes:
        mesh = parse_mesh(mesh_text)
        timers = {name: TrainStepTimer(optimizer_config(name, mesh), FLAGS.steps) for name in ["adamw"] + names}
        for timer in timers.values():
            timer.run(2)  # compilation, and SOAP's statistics-only first call
        times = dict(zip(timers, time_rounds(list(timers.values()), FLAGS.steps, FLAGS.rounds)))
        rows = {name: {"step_time_s": min(ts), "median_step_time_s": sorted(ts)[len(ts) // 2], "rounds_s": ts,
                       "final_loss": float(timers[name].metrics["loss"])} for name, ts in times.items()}
        for name, row in rows.items():
            row["ratio_to_adamw"] = row["step_time_s"] / rows["adamw"]["step_time_s"]
            row["median_ratio_to_adamw"] = row["median_step_time_s"] / rows["adamw"]["median_step_time_s"]
            print(f"[{mesh_text}] {name}: {row['step_time_s']:.3f} s/step (best round), "
                  f"x{row['ratio_to_adamw']:.2f} AdamW; rounds {', '.join(f'{t:.2f}' for t in row['rounds_s'])}",
                  flush=True)
        result["meshes"][mesh_text] = rows
        del timers
    return result


def step_time_table(result: dict[str, Any]) -> str:
    meshes = list(result["meshes"])
    names = list(result["meshes"][meshes[0]])  # AdamW first, then as timed
    head = "| optimizer | " + " | ".join(f"step (s), mesh {m} | x AdamW | x AdamW (median round)"
                                         for m in meshes) + " |"
    lines = [f"Step time, {result['model']}, seq {result['seq_len']} x batch {result['batch_size']}, "
             f"best of {result['rounds']} round-robin rounds of {result['steps']} steps "
             f"(SOAP refresh every {result['precondition_frequency']}):", "",
             head, "|---" * (1 + 3 * len(meshes)) + "|"]
    for name in names:
        cells = []
        for m in meshes:
            row = result["meshes"][m][name]
            cells += [f"{row['step_time_s']:.3f}", f"{row['ratio_to_adamw']:.2f}", f"{row['median_ratio_to_adamw']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- (b) steps to target


def train_curve(optimizer: str, lr: float) -> dict[str, Any]:
    """Validation-loss curve of one run of experiments/soap_vs_adamw.py (arm adamw | soap | soap_block<N>)."""
    arg = f"soap,block={optimizer[len(BLOCKED):]}" if optimizer.startswith(BLOCKED) else optimizer
    spec = os.path.join(ROOT, f"experiments/soap_vs_adamw.py:{arg},lr={lr}")
    config = config_lib.apply_override_strings(config_lib.load_experiment(spec), {
        "train.steps": str(FLAGS.train_steps),
        "optimizer.warmup_steps": str(max(1, FLAGS.train_steps // 10))})
    exp = build_experiment(config, LMTask())
    cfg = exp.config
    step, sharding = jit_train_step(exp), mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
    eval_step = jit_eval_step(exp)
    batches = make_train_iterator(cfg, exp.tokenizer)
    eval_batches = make_eval_batches(cfg, exp.tokenizer, "validation", FLAGS.eval_batches)
    curve, start = [], time.perf_counter()
    with jax.set_mesh(exp.mesh):
        state = state_lib.init_state(cfg.model, exp.tx, cfg.seed, exp.shardings)
        for i in range(1, cfg.train.steps + 1):
            state, metrics = step(state, to_global(next(batches), sharding))
            if i % FLAGS.eval_every == 0 or i == cfg.train.steps:
                loss = evaluate(eval_step, state.params, eval_batches, exp.mesh, cfg.mesh.rules)["loss"]
                curve.append((i, loss))
    seconds = time.perf_counter() - start
    print(f"{optimizer} lr={lr:g}: final validation loss {curve[-1][1]:.4f} ({seconds:.0f} s)", flush=True)
    return {"optimizer": optimizer, "lr": lr, "curve": curve, "final_loss": curve[-1][1], "seconds": seconds,
            "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def run_steps_to_target() -> dict[str, Any]:
    spec = importlib_experiment()
    arms = ["adamw", "soap"] + blocked_arms()
    soap_lrs = tuple(float(x) for x in FLAGS.lrs) or spec.SWEEP["soap"]
    lrs = {name: soap_lrs for name in arms}
    lrs["adamw"] = tuple(float(x) for x in FLAGS.adamw_lrs or FLAGS.lrs) or spec.SWEEP["adamw"]
    runs = [train_curve(name, lr) for name in arms for lr in lrs[name]]
    best = {name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["final_loss"]) for name in arms}
    target = best["adamw"]["final_loss"]
    for r in runs:
        r["steps_to_target"] = steps_to_reach(r["curve"], target)
    steps = {name: best[name]["steps_to_target"] for name in arms}
    return {"experiment": "experiments/soap_vs_adamw.py", "train_steps": FLAGS.train_steps,
            "eval_every": FLAGS.eval_every, "eval_batches": FLAGS.eval_batches, "target_loss": target,
            "best_lr": {n: best[n]["lr"] for n in best}, "runs": runs,
            "steps_ratio_to_adamw": {n: _ratio(steps[n], steps["adamw"]) for n in arms},
            "soap_steps_ratio": _ratio(steps["soap"], steps["adamw"]),
            "blocked_steps_ratio_to_soap": {n: _ratio(steps[n], steps["soap"]) for n in blocked_arms()}}


def importlib_experiment():
    import importlib.util
    path = os.path.join(ROOT, "experiments/soap_vs_adamw.py")
    module_spec = importlib.util.spec_from_file_location("soap_vs_adamw", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def steps_table(result: dict[str, Any]) -> str:
    tokens = result["runs"][0]["tokens_per_step"]
    lines = [f"Steps to AdamW's best final validation loss ({result['target_loss']:.4f} nats/byte), "
             f"tiny d128 x 4 model, {result['train_steps']} steps x {tokens} tokens, "
             f"validation every {result['eval_every']} steps on {result['eval_batches']} batches:", "",
             "| optimizer (hidden matrices) | lr | final val loss | steps to target | best lr |",
             "|---|---|---|---|---|"]
    for r in result["runs"]:
        steps = "not reached" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
        best = "yes" if result["best_lr"][r["optimizer"]] == r["lr"] else ""
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['final_loss']:.4f} | {steps} | {best} |")
    lines.append("")
    for name, ratio in result.get("steps_ratio_to_adamw", {"soap": result["soap_steps_ratio"]}).items():
        if name != "adamw":
            lines.append(f"{name} / AdamW steps to target (best rates): "
                         + ("never reached" if ratio is None else f"{ratio:.2f}x"))
    for name, ratio in result.get("blocked_steps_ratio_to_soap", {}).items():
        lines.append(f"{name} / unblocked SOAP steps to target (best rates): "
                     + ("n/a (one never reached it)" if ratio is None else f"{ratio:.3f}x"))
    return "\n".join(lines)


def plot_curves(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"adamw": "tab:blue", "soap": "tab:red"}  # a blocked SOAP arm: green
    for r in result["runs"]:
        best = result["best_lr"][r["optimizer"]] == r["lr"]
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, color=colors.get(r["optimizer"], "tab:green"), lw=2.2 if best else 1.0,
                ls="-" if best else "--",
                alpha=1.0 if best else 0.6, label=f"{r['optimizer']} lr={r['lr']:g}" + (" (best)" if best else ""))
    ax.axhline(result["target_loss"], color="gray", lw=0.8, ls=":", label="AdamW best final")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("SOAP (hidden matrices) vs AdamW, tiny byte-level Shakespeare LM")
    finals = [r["final_loss"] for r in result["runs"]]
    ax.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    results = {"devices": jax.device_count(), "platform": jax.devices()[0].platform}
    tables = []
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)  # before the PNG lands there
    if FLAGS.part in ("step_time", "all"):
        results["step_time"] = run_step_time()
        tables.append(step_time_table(results["step_time"]))
    if FLAGS.part in ("steps_to_target", "all"):
        results["steps_to_target"] = run_steps_to_target()
        tables.append(steps_table(results["steps_to_target"]))
        png = os.path.splitext(FLAGS.out)[0] + ".png"
        plot_curves(results["steps_to_target"], png)
        print(f"wrote {png}")
    if os.path.exists(FLAGS.out):  # keep the other part's results (read now: a part takes minutes)
        with open(FLAGS.out) as f:
            results = {**json.load(f), **results}
    write_results(FLAGS.out, results)
    print("\n\n".join(tables))


if __name__ == "__main__":
    app.run(main)
