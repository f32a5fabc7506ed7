"""Can a GQ-VAE supply an 8k vocabulary? Trains `experiments/gqvae_shakespeare.py:v8k` (or
--variant) with the runner up to --steps (resuming --workdir), then builds 1k, 4k and 8k tokenizers
from the checkpoint on the train split; a size is buildable when the model's segmentation of the
train split has enough distinct multi-byte segments (8192 needs 7933; the error says how many).

    python benchmarks/gqvae_codes.py --steps 300 --workdir workdirs/gqvae_8k

Prints codes in use (since the last re-seeding) and seconds per step along the run, and writes
benchmarks/results/gqvae_codes.json (`this_run_train_s`: this invocation's training, from the
workdir's step to --steps).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set

import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script

flags.DEFINE_integer("steps", 300, "train up to this step (the run resumes from --workdir)")
flags.DEFINE_string("workdir", "workdirs/gqvae_8k", "runner workdir")
flags.DEFINE_string("variant", "v8k", "experiments/gqvae_shakespeare.py variant")
flags.DEFINE_string("out", "benchmarks/results/gqvae_codes.json", "JSON results")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from gqlm.config import load_experiment
    from gqlm.data.corpora import load_documents
    from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
    from gqlm.train.loop import train
    from timing import write_results

    config = load_experiment(f"experiments/gqvae_shakespeare.py:{FLAGS.variant}")
    start = time.perf_counter()
    train(config, FLAGS.workdir, stop_at=FLAGS.steps)
    train_s = time.perf_counter() - start
    with open(os.path.join(FLAGS.workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    print(f"{'step':>6} {'codes_in_use':>12} {'usage/batch':>11} {'byte_acc':>8} {'tok_len':>7} {'s/step':>7}")
    for r in rows:
        print(f"{r['step']:>6} {int(r['codes_in_use']):>12} {r['codebook_usage']:>11.4f} {r['byte_accuracy']:>8.3f} "
              f"{r['mean_token_len']:>7.2f} {r.get('step_time_s', float('nan')):>7.2f}")
    texts = load_documents(config.data, "train")[:]
    start = time.perf_counter()
    sizes = [1024, 4096, 8192]
    stats: dict = {}
    built = GQVAETokenizer.build_many(*load_checkpoint(FLAGS.workdir), sizes, texts, strict=False, stats=stats)
    build_s = time.perf_counter() - start
    buildable = {v: not isinstance(t, Exception) for v, t in built.items()}
    for v, t in built.items():
        print(f"vocab_size={v}: " + ("built" if buildable[v] else f"not buildable: {t}"))
    print(f"({build_s:.0f} s to segment the train split) {stats}")
    write_results(FLAGS.out, {
        "variant": FLAGS.variant, "steps": rows[-1]["step"] if rows else 0,
        "codebook_size": config.gqvae.codebook_size, "this_run_train_s": train_s,
        "buildable": {str(v): ok for v, ok in buildable.items()}, "train_split_segmentation": stats,
        "not_buildable_because": {str(v): str(t) for v, t in built.items() if not buildable[v]},
        "curve": [{k: r.get(k) for k in ("step", "codes_in_use", "codebook_usage", "byte_accuracy",
                                         "mean_token_len", "loss", "step_time_s")} for r in rows],
        "command": f"python benchmarks/gqvae_codes.py --steps {FLAGS.steps} --workdir {FLAGS.workdir} "
                   f"--variant {FLAGS.variant}"})


if __name__ == "__main__":
    app.run(main)
