"""MoE throughput and quality: dense vs MoE at matched active FLOPs, dropless vs capacity, expert axis 1/4/8.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/moe.py [--steps 5] [--bpb_steps 250]
    python benchmarks/moe.py --sections=layer,train --steps 3 --rounds 3 --balance_steps 100   # timing only
    python benchmarks/moe.py --sections=quality --quality_cases=moe   # rerun one part; the rest is kept

Three sections on the same 8 (fake CPU) devices, so the ratios within a section are comparable:
1. layer: forward + backward of one MLP layer on B x T tokens (jitted, params sharded by the
   rules table): the dense SwiGLU of width F, and 8 experts of width F/2 with top-2 routing (the
   same active FLOPs), for each dispatch/backend and mesh (data=8/G, expert=G).
2. train: a full train step (AdamW) of experiments/tiny_cpu.py vs experiments/moe_tiny_cpu.py,
   twice: right after init, where the router is far from balanced (up to half the copies on one
   expert), and with every MoE case restarted from the state of the MoE model trained
   --balance_steps steps (load-balancing loss included); `max load` = E x the largest expert's
   share of copies in any layer (1 = balanced, 4 = half on one expert with top-2).
3. quality: validation bits per byte of both after the demo's 250 steps (same tokens, same
   active FLOPs per token, so the same training compute), via gqlm.train.loop.train.
Prints markdown tables (ratio = step time / the dense model's; target <= 1.5) and writes
benchmarks/results/moe.json. Timing: every case of a section is built and warmed up first, then
all are timed in --rounds rounds of --steps steps each (so load drift on a shared machine hits
every case alike); a case's step time is its best round's mean, the median round is kept too.
Each step is waited for before the next is dispatched: a queue of dozens of asynchronously
dispatched 8-device steps (in a process holding several compiled steps) has hung XLA:CPU's
in-process all-reduce rendezvous, with the old and the new MoE code alike.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set


import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm import mesh as mesh_lib  # noqa: E402
from gqlm.models.layers import Mlp  # noqa: E402
from gqlm.models.moe import MoeMLP  # noqa: E402
from gqlm.models.flops import flops_per_token  # noqa: E402
from gqlm.tokenizers import load_tokenizer  # noqa: E402
from gqlm.train.experiment import resolve_vocab  # noqa: E402
from gqlm.train.tasks.lm import LMTask  # noqa: E402
from timing import TrainStepTimer, time_rounds, write_results  # noqa: E402

flags.DEFINE_integer("steps", 5, "Timed steps per case per round (after 2 warm-up steps).")
flags.DEFINE_integer("rounds", 3, "Timing rounds over all cases of a section (the best round counts).")
flags.DEFINE_integer("balance_steps", 100, "Train section: also time the MoE cases from the state after this "
                     "many training steps (router load-balanced); 0 = right after init only.")
flags.DEFINE_integer("tokens", 8192, "Tokens per layer-benchmark batch (B x T, T = 256).")
flags.DEFINE_list("sections", ["layer", "train", "quality"], "Which sections to run; the others keep "
                  "their results from an existing --out file.")
flags.DEFINE_list("quality_cases", ["dense", "moe"], "Models of the quality section.")
flags.DEFINE_integer("bpb_steps", 250, "Training steps of the dense-vs-MoE quality runs (the demo's 250).")
flags.DEFINE_integer("eval_batches", 16, "Validation batches (x 4,096 tokens) of the quality runs.")
flags.DEFINE_string("out", "benchmarks/results/moe.json", "JSON output.")
FLAGS = flags.FLAGS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGET_RATIO = 1.5
LAYER_CASES = [  # (name, moe overrides or None for the dense MLP, expert axis sizes)
    ("dense_mlp", None, (1,)),
    ("moe_dropless_dense", dict(dispatch="dropless", backend="dense"), (1, 4, 8)),
    ("moe_capacity_1.25", dict(dispatch="capacity", capacity_factor=1.25), (1, 4, 8)),
    ("moe_dropless_ragged", dict(dispatch="dropless", backend="ragged"), (1,)),
]
TRAIN_CASES = [("dense", "experiments/tiny_cpu.py", None, 1)] + [
    (f"moe_{dispatch}", "experiments/moe_tiny_cpu.py", dispatch, expert)
    for dispatch in ("dropless", "capacity") for expert in (1, 4, 8)]
QUALITY_CASES = [("dense", "experiments/tiny_cpu.py"), ("moe", "experiments/moe_tiny_cpu.py")]


def layer_config(moe: dict | None, expert: int) -> config_lib.ConfigDict:
    c = config_lib.base_config()
    c.model.embed_dim, c.model.mlp_dim = 256, 1024
    if moe is not None:
        e = c.model.moe
        e.num_experts, e.top_k, e.mlp_dim = 8, 2, 512
        e.update(moe)
    c.mesh.data, c.mesh.expert = 8 // expert, expert
    return c


class LayerCase:
    """Forward + backward of one MLP layer (dense, or MoE with `moe` overrides) on its mesh."""

    def __init__(self, moe: dict | None, expert: int):
        config = layer_config(moe, expert)
        cfg = config.model
        module = MoeMLP(cfg, rngs=nnx.Rngs(0)) if moe is not None else Mlp(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(module)
        self.mesh = mesh_lib.make_mesh(config.mesh)
        seq = 256

        def loss(params, x_BTD):
            layer = nnx.merge(graphdef, params)
            if moe is None:
                return jnp.mean(jnp.square(layer(x_BTD))), jnp.zeros(())
            y_BTD, aux = layer(x_BTD, jnp.ones(x_BTD.shape[:2], jnp.int32))
            return jnp.mean(jnp.square(y_BTD)) + 0.01 * aux["lb_loss"], aux["drop_fraction"]

        self.step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        with jax.set_mesh(self.mesh):
            self.params = jax.device_put(nnx.to_pure_dict(state),
                                         mesh_lib.param_shardings(state, config.mesh.rules, self.mesh))
            self.x = jax.device_put(jax.random.normal(jax.random.key(0), (FLAGS.tokens // seq, seq, cfg.embed_dim)),
                                    mesh_lib.batch_sharding(self.mesh, config.mesh.rules))
        self.tokens = FLAGS.tokens

    def run(self, steps: int) -> float:
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            for _ in range(steps):
                (_, self.drop), _ = jax.block_until_ready(self.step(self.params, self.x))
        return (time.perf_counter() - start) / steps


class TrainCase(TrainStepTimer):
    """A train step timed in rounds, with the MoE router's balance of its last step."""

    def __init__(self, experiment: str, overrides: dict[str, str]):
        config = config_lib.load_experiment(os.path.join(ROOT, experiment))
        super().__init__(config_lib.apply_override_strings(config, {**overrides, "optimizer.warmup_steps": "1"}),
                         FLAGS.steps)

    def max_load(self) -> float | None:
        """The largest E x (share of copies) of any expert in any layer, last step (1 = balanced);
        None for a dense model."""
        loads = [float(v) for k, v in self.metrics.items() if k.startswith("layer_") and k.endswith("/max_load")]
        return max(loads) if loads else None


def trained_moe_state(steps: int) -> Any:
    """The MoE model's state after `steps` training steps (dropless, expert axis 1): the router
    has had that many load-balancing updates. Host copy, for every case's mesh."""
    case = TrainCase("experiments/moe_tiny_cpu.py", train_overrides("dropless", 1))
    case.run(steps)
    print(f"trained the MoE model {steps} steps: max load {case.max_load():.2f}", flush=True)
    return jax.device_get(case.state)


def measure_quality(experiment: str, steps: int) -> dict:
    """Validation loss and bpb after `steps` steps of the experiment (short schedule, no samples)."""
    from gqlm.train.loop import train
    config = config_lib.load_experiment(os.path.join(ROOT, experiment))
    overrides = {"train.steps": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
                 "train.eval_batches": FLAGS.eval_batches,
                 "train.log_every": max(1, steps // 5), "train.sample_tokens": 0, "train.progress": False,
                 "optimizer.warmup_steps": max(1, steps // 10)}
    config = config_lib.apply_overrides(config, dict(overrides))
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        metrics = train(config, workdir, LMTask())
        seconds = time.perf_counter() - start
    cfg = resolve_vocab(config, load_tokenizer(config.data.tokenizer)).model
    return {"validation_loss": metrics["loss"], "validation_bpb": metrics["bpb"], "steps": steps,
            "tokens": steps * config.data.batch_size * config.data.seq_len,
            "train_flops_per_token": flops_per_token(cfg, config.data.seq_len), "wall_s": seconds}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[k] is None else format(row[k], f) for _, k, f in columns) + " |")
    return "\n".join(lines)


def with_ratio(rows: list[dict]) -> list[dict]:
    """Step time over the baseline's (the first row's)."""
    for row in rows:
        row["ratio_vs_dense"] = row["step_time_s"] / rows[0]["step_time_s"]
        row["meets_target"] = bool(row["ratio_vs_dense"] <= TARGET_RATIO)
    return rows


TIME_COLUMNS = [("case", "case", "s"), ("expert axis", "expert", "d"), ("step ms", "step_ms", ".0f"),
                ("tokens/s", "tokens_per_s", ",.0f"), ("x dense", "ratio_vs_dense", ".2f")]


def previous_results(path: str) -> dict:
    """Results of an earlier run (sections not rerun keep them); {} when there are none."""
    import json
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def timed_rows(cases: list, times: list[list[float]], **extra) -> list[dict]:
    """One row per case: the best round's step time (and the median round's), ratio to the first case."""
    rows = [{"case": name, "expert": expert, **extra, "step_time_s": min(times[i]),
             "median_step_time_s": sorted(times[i])[len(times[i]) // 2],
             "tokens_per_s": case.tokens / min(times[i]), "step_ms": min(times[i]) * 1e3}
            for i, (name, expert, case) in enumerate(cases)]
    return with_ratio(rows)


def run_layer(results: dict) -> None:
    cases = [(name, expert, LayerCase(moe, expert)) for name, moe, experts in LAYER_CASES for expert in experts]
    for _, _, case in cases:
        case.run(2)  # compilation
    rows = results["layer"] = timed_rows(cases, time_rounds([case for _, _, case in cases], FLAGS.steps, FLAGS.rounds))
    for row, (_, _, case) in zip(rows, cases):
        row["drop_fraction"] = float(case.drop)
        print(f"layer {row['case']} expert={row['expert']}: {row['step_ms']:.0f} ms (x{row['ratio_vs_dense']:.2f})",
              flush=True)


def train_overrides(dispatch: str | None, expert: int) -> dict[str, str]:
    overrides = {"mesh.data": str(8 // expert), "mesh.expert": str(expert)}
    return overrides | ({"model.moe.dispatch": dispatch} if dispatch else {})


def run_train(results: dict) -> None:
    """Every case built first, then timed in rounds (each case `steps` steps per round), so the
    ratios come from the same minutes of a shared machine; step time = the best round's mean.
    Timed twice: right after init, then (--balance_steps) with every MoE case restarted from the
    state of an MoE model trained that many steps (the dense step's cost does not depend on it)."""
    cases = [(name, expert, TrainCase(experiment, train_overrides(dispatch, expert)))
             for name, experiment, dispatch, expert in TRAIN_CASES]
    for _, _, case in cases:
        case.run(2)  # compilation and first-touch allocation
    states = [("init", None)]
    if FLAGS.balance_steps:
        states.append((f"after {FLAGS.balance_steps} steps", trained_moe_state(FLAGS.balance_steps)))
    rows = results["train"] = []
    for state_name, state in states:
        if state is not None:
            for name, _, case in cases:
                if name != "dense":
                    case.restart_from(state)
        section = timed_rows(cases, time_rounds([case for _, _, case in cases], FLAGS.steps, FLAGS.rounds), state=state_name)
        for row, (_, _, case) in zip(section, cases):
            row["max_load"] = case.max_load()
        rows += section
        for row in section:
            print(f"train [{state_name}] {row['case']} expert={row['expert']}: {row['step_ms']:.0f} ms "
                  f"(x{row['ratio_vs_dense']:.2f}, max load {row['max_load']})", flush=True)


def run_quality(results: dict) -> None:
    rows = {row["case"]: row for row in results.get("quality", [])}
    for name, experiment in QUALITY_CASES:
        if name in FLAGS.quality_cases:
            rows[name] = measure_quality(experiment, FLAGS.bpb_steps) | {"case": name}
            print(f"quality {name}: bpb {rows[name]['validation_bpb']:.4f} ({rows[name]['wall_s']:.0f} s)",
                  flush=True)
    results["quality"] = [rows[name] for name, _ in QUALITY_CASES if name in rows]


def print_tables(results: dict) -> None:
    if results.get("layer"):
        print(f"\n### MoE layer, forward + backward ({results['layer_tokens']} tokens, D=256; dense F=1024 "
              f"vs 8 experts F=512 top-2)\n")
        print(table(results["layer"], TIME_COLUMNS + [("dropped", "drop_fraction", ".4f")]))
    if results.get("train"):
        print("\n### Train step (AdamW): tiny_cpu vs moe_tiny_cpu (4 layers, d128, 4096 tokens/step)\n")
        print(table(results["train"], [("state", "state", "s")] + TIME_COLUMNS + [("max load", "max_load", ".2f")]))
    if results.get("quality"):
        print("\n### Validation bpb at equal training compute (same steps and tokens, same active FLOPs per "
              "token)\n")
        print(table(results["quality"], [("model", "case", "s"), ("steps", "steps", "d"),
                                         ("train FLOPs/token", "train_flops_per_token", ".3g"),
                                         ("val loss", "validation_loss", ".4f"), ("val bpb", "validation_bpb", ".4f"),
                                         ("wall s", "wall_s", ".0f")]))


def main(argv):
    del argv
    results = previous_results(FLAGS.out)
    results.update(devices=jax.device_count(), platform=jax.devices()[0].platform,
                   layer_tokens=FLAGS.tokens, target_ratio=TARGET_RATIO)
    runs = {"layer": run_layer, "train": run_train, "quality": run_quality}
    for section in FLAGS.sections:  # in the order given
        runs[section](results)
    print_tables(results)
    write_results(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
