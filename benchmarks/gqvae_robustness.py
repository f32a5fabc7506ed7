"""Does the GQ-VAE gate collapse? Short CPU runs of `experiments/gqvae_shakespeare.py` (a variant,
shrunk by flags) for each gate parametrisation x compression weight x seed; for each: the collapse
monitor's verdict (gqlm/train/tasks/gqvae/collapse.py, over the last logged train steps) and the
validation metrics at the end: mean token length, share of 3-10-byte pieces cut inside, forced
cuts, saturated gates, codes in use, byte accuracy.

    python benchmarks/gqvae_robustness.py --gates paper,bounded --weights 3,1 --targets 0,3 --seeds 0,1,2
    python benchmarks/gqvae_robustness.py --steps 400 --warmup 100 --reseed_every 50 --batch_size 128 \
      --gates bounded --targets 3.5 --weights 3 --seeds 0,1,2 --keep_dir workdirs/gqrob   # the CPU recipe, :cpu

The flags --steps/--warmup/--reseed_every/--batch_size/--codebook replace the variant's schedule
(defaults: a shrunk 100-step one); --corpus trains on another corpus; --keep_dir keeps each run's
workdir (a checkpoint `gqlm.tokenize` reads) instead of a temporary one; a kept run re-run resumes.

Prints the table and writes benchmarks/results/gqvae_robustness.json (one row per run, with the
exact overrides and the logged curve of the collapse metrics).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set

import contextlib  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script

flags.DEFINE_string("variant", "", "experiments/gqvae_shakespeare.py variant (empty: the CPU recipe)")
flags.DEFINE_string("corpus", "", "data.corpus (empty: the experiment's, shakespeare)")
flags.DEFINE_integer("steps", 100, "train steps per run")
flags.DEFINE_integer("warmup", 30, "gqvae.warmup_steps")
flags.DEFINE_integer("reseed_every", 15, "gqvae.reseed_every")
flags.DEFINE_integer("batch_size", 64, "gqvae.batch_size")
flags.DEFINE_integer("codebook", 4096, "gqvae.codebook_size")
flags.DEFINE_integer("log_every", 10, "train.log_every (the monitor's resolution)")
flags.DEFINE_list("gates", ["paper", "bounded"], "gqvae.gate values")
flags.DEFINE_list("weights", ["3", "1"], "gqvae.gate_loss_weight values")
flags.DEFINE_list("ramps", ["0"], "gqvae.gate_weight_ramp_steps values")
flags.DEFINE_list("targets", ["0"], "gqvae.gate_target_len values (0: off)")
flags.DEFINE_list("seeds", ["0"], "config.seed values")
flags.DEFINE_string("keep_dir", "", "keep each run's workdir (checkpoint, metrics) under this directory, named by "
                    "its setting (empty: temporary)")
flags.DEFINE_bool("append", False, "add these runs to --out's (its earlier commands are kept)")
flags.DEFINE_string("out", "benchmarks/results/gqvae_robustness.json", "JSON results")
FLAGS = flags.FLAGS
CURVE_KEYS = ("step", "mean_gate", "forced_cut_share", "pretoken_cut_share", "saturated_gates", "mean_token_len",
              "codes_in_use", "byte_accuracy", "step_time_s")


def run_config(setting: dict):
    from gqlm.config import load_experiment

    config = load_experiment(f"experiments/gqvae_shakespeare.py:{FLAGS.variant}")
    q, t = config.gqvae, config.train
    q.update({k: v for k, v in setting.items() if k != "seed"})
    q.update(dict(warmup_steps=FLAGS.warmup, reseed_every=FLAGS.reseed_every, batch_size=FLAGS.batch_size,
                  codebook_size=FLAGS.codebook))
    t.update(dict(steps=FLAGS.steps, log_every=FLAGS.log_every, eval_every=FLAGS.steps,
                  checkpoint_every=FLAGS.steps, progress=False))
    config.seed = setting["seed"]
    config.data.corpus = FLAGS.corpus or config.data.corpus
    return config


def run_name(corpus: str, setting: dict) -> str:
    values = [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in setting.items()]
    return "_".join([corpus, FLAGS.variant or "cpu"] + values)


def workdir_of(corpus: str, setting: dict):
    """A temporary workdir, or a kept one under --keep_dir."""
    if not FLAGS.keep_dir:
        return tempfile.TemporaryDirectory()
    path = os.path.join(FLAGS.keep_dir, run_name(corpus, setting))
    os.makedirs(path, exist_ok=True)
    return contextlib.nullcontext(path)


def one_run(task, setting: dict) -> dict:
    """One run with `task` (a GQVAETask: the corpus' pieces are read once for all runs)."""
    from gqlm.train.loop import train
    from gqlm.train.tasks.gqvae.collapse import WINDOW, CollapseMonitor, collapse_state

    task.monitor = CollapseMonitor()
    config = run_config(setting)
    with workdir_of(config.data.corpus, setting) as workdir:
        start = time.perf_counter()
        final = train(config, workdir, task)
        seconds = time.perf_counter() - start
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    last = rows[-WINDOW:]
    verdict = collapse_state([r["pretoken_cut_share"] for r in last], [r["mean_token_len"] for r in last])
    return {**setting, "corpus": config.data.corpus, "steps": FLAGS.steps, "verdict": verdict, "train_s": seconds,
            "workdir": FLAGS.keep_dir and workdir,
            "validation": {k: final[k] for k in ("mean_token_len", "pretoken_cut_share", "forced_cut_share",
                                                 "saturated_gates", "mean_gate", "codes_in_use", "byte_accuracy",
                                                 "loss")},
            "curve": [{k: r.get(k) for k in CURVE_KEYS} for r in rows]}


def settings() -> list[dict]:
    grid = itertools.product(FLAGS.gates, map(float, FLAGS.weights), map(int, FLAGS.ramps),
                             map(float, FLAGS.targets), map(int, FLAGS.seeds))
    return [dict(gate=g, gate_loss_weight=w, gate_weight_ramp_steps=r, gate_target_len=t, seed=s)
            for g, w, r, t, s in grid]


def main(argv) -> None:
    del argv
    from absl import logging
    from gqlm.train.tasks.gqvae.task import GQVAETask
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines drown the table
    from timing import write_results

    command = " ".join(["python benchmarks/gqvae_robustness.py"] + sys.argv[1:])
    previous = json.load(open(FLAGS.out)) if FLAGS.append and os.path.exists(FLAGS.out) else {}
    runs, task = [], GQVAETask()
    print(f"{'gate':>16} {'w':>4} {'ramp':>4} {'target':>6} {'seed':>4} {'tok_len':>7} {'cut3-10':>7} {'forced':>6} "
          f"{'satur':>5} {'codes':>5} {'byte_acc':>8} {'s':>5}  verdict", flush=True)
    for setting in settings():
        r = one_run(task, setting)
        runs.append({**r, "command": command})
        v = r["validation"]
        print(f"{r['gate']:>16} {r['gate_loss_weight']:>4g} {r['gate_weight_ramp_steps']:>4} {r['gate_target_len']:>6g} "
              f"{r['seed']:>4} {v['mean_token_len']:>7.2f} {v['pretoken_cut_share']:>7.3f} {v['forced_cut_share']:>6.3f} "
              f"{v['saturated_gates']:>5.2f} {int(v['codes_in_use']):>5} {v['byte_accuracy']:>8.3f} "
              f"{r['train_s']:>5.0f}  {r['verdict']}", flush=True)
    write_results(FLAGS.out, {"commands": previous.get("commands", []) + [command],
                              "runs": previous.get("runs", []) + runs})


if __name__ == "__main__":
    app.run(main)
