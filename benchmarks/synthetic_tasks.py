"""Synthetic tasks: RoPE vs ALiBi vs NoPE on length generalization; dense vs MoE on recall, addition
(reasoning) and phonebook (memorization).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/synthetic_tasks.py

Every case trains `experiments/synthetic_tasks.py:TASK,bench[,OPTION]` through the real runner
(`gqlm.train.loop.train`: d128 x 2, byte tokenizer, rows of 64 tokens, 32 rows per step, 8-way
data parallel on CPU) on lengths 1..L, then measures exact-match accuracy (every answer token the
argmax of the teacher-forced logits, `gqlm.eval.synthetic_eval`) on held-out examples of length
L/2, L, 2L and 4L:
(a) copy (L = 8) with RoPE, ALiBi and no position encoding (NoPE);
(b) recall (in-context phonebook lookup, L = 4 entries) and addition (L = 4 digits), each with the
    dense model and with its MoE twin (4 experts of width mlp_dim / 2, top-2 routing: the same
    active parameters and FLOPs per token, twice the MLP parameters; checked here, recorded in
    the JSON);
(c) phonebook (memorization: a fixed book of 2,000 names with 4-digit numbers, queried in training,
    evaluated on every entry once, so "L" is the fraction of the book memorized), dense and MoE.
A "uniform guess" column gives chance at length L: 26^-L (copy), 1/L (pick one of the book's
values, recall) and 10^-L (addition, phonebook); "answer tokens right" is the per-token accuracy at L.
Running some --cases replaces those rows of an existing --out JSON and keeps the others.
`--replot` redraws the table and PNG from the JSON without training; with `--merge A.json,B.json`
it first merges those files' rows in (e.g. cases run in parallel into separate files).
Prints a markdown table and writes benchmarks/results/synthetic_tasks.json and .png. One seed.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm.eval.synthetic_eval import accuracy_by_length  # noqa: E402
from gqlm.models.flops import count_params, flops_per_token  # noqa: E402
from gqlm.tokenizers import load_tokenizer  # noqa: E402
from gqlm.train.checkpoint import restore_trained  # noqa: E402
from gqlm.train.experiment import resolve_vocab  # noqa: E402
from gqlm.train.tasks.lm import LMTask  # noqa: E402
from timing import write_results  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXPERIMENT = os.path.join(ROOT, "experiments/synthetic_tasks.py")
CASES = {  # name: (task, option)
    "copy_rope": ("copy", "rope"), "copy_alibi": ("copy", "alibi"), "copy_nope": ("copy", "none"),
    "recall_dense": ("recall", ""), "recall_moe": ("recall", "moe"),
    "addition_dense": ("addition", ""), "addition_moe": ("addition", "moe"),
    "phonebook_dense": ("phonebook", ""), "phonebook_moe": ("phonebook", "moe"),
}

flags.DEFINE_list("cases", list(CASES), f"Cases to run ({', '.join(CASES)}).")
flags.DEFINE_integer("steps", 0, "Training steps per case; 0: the bench option's (experiments/synthetic_tasks.py).")
flags.DEFINE_integer("phonebook_size", 0, "Entries of the phonebook cases' fixed book; 0: the bench option's.")
flags.DEFINE_integer("eval_batches", 4, "Evaluation batches (of 32 rows) per length.")
flags.DEFINE_bool("replot", False, "Only print the table and redraw the PNG from the existing --out JSON.")
flags.DEFINE_list("merge", [], "With --replot: first merge these JSONs' rows into --out (same case replaced).")
flags.DEFINE_string("out", "benchmarks/results/synthetic_tasks.json", "JSON output (PNG next to it).")
FLAGS = flags.FLAGS


def case_config(task: str, option: str) -> config_lib.ConfigDict:
    config = config_lib.load_experiment(f"{EXPERIMENT}:{','.join(filter(None, (task, 'bench', option)))}")
    if FLAGS.steps:
        steps = str(FLAGS.steps)
        config = config_lib.apply_override_strings(config, {"train.steps": steps, "train.eval_every": steps,
                                                     "train.checkpoint_every": steps})
    if FLAGS.phonebook_size:
        config = config_lib.apply_override_strings(config, {"data.synthetic_phonebook_size": str(FLAGS.phonebook_size)})
    return config


def eval_lengths(task: str, max_len: int) -> list[int]:
    """L/2, L, 2L, 4L for train lengths 1..L; phonebook: L only (the whole book, L-digit numbers)."""
    return [max_len] if task == "phonebook" else [max(1, max_len // 2), max_len, 2 * max_len, 4 * max_len]


def chance(task: str, n: int) -> float:
    """Exact-match accuracy of a uniform guess at length n."""
    return {"copy": 26.0 ** -n, "recall": 1.0 / n, "addition": 10.0 ** -n, "phonebook": 10.0 ** -n}[task]


def run_case(name: str, task: str, option: str) -> dict[str, Any]:
    from gqlm.train.loop import train
    config = case_config(task, option)
    model = resolve_vocab(config, load_tokenizer(config.data.tokenizer)).model
    lengths = eval_lengths(task, config.data.synthetic_max_len)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        metrics = train(config, workdir, LMTask())
        train_s = time.perf_counter() - start
        exp, step, state = restore_trained(workdir, LMTask())
        with jax.set_mesh(exp.mesh):
            by_length = accuracy_by_length(exp, state.params, lengths, FLAGS.eval_batches)
    params = count_params(model)
    return {"case": name, "task": task, "position": config.model.position,
            "experts": config.model.moe.num_experts, "top_k": config.model.moe.top_k,
            "train_lengths": [config.data.synthetic_min_len, config.data.synthetic_max_len],
            "phonebook_size": config.data.synthetic_phonebook_size if task == "phonebook" else None,
            "steps": step, "tokens": step * config.data.batch_size * config.data.seq_len,
            "params": params["total"], "active_non_embedding_params": params["active_non_embedding"],
            "train_flops_per_token": flops_per_token(model, config.data.seq_len),
            "validation_loss": metrics.get("loss"), "train_s": train_s,
            "chance_at_L": chance(task, config.data.synthetic_max_len),
            "by_length": {str(n): r for n, r in by_length.items()}}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | train lengths | steps | params (active non-emb.) | L/2 | L | 2L | 4L | uniform guess at L "
             "| answer tokens right at L | train s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["train_lengths"]
        cells = (r["by_length"].get(str(n)) for n in (max(1, hi // 2), hi, 2 * hi, 4 * hi))
        accs = [f"{v['accuracy']:.1%} (n={v['examples']} ex.)" if v else "-" for v in cells]
        lines.append(f"| {r['case']} | {lo}..{hi} | {r['steps']} | {r['params']:,} ({r['active_non_embedding_params']:,}) | "
                     + " | ".join(accs) + f" | {r['chance_at_L']:.2g} | {r['by_length'][str(hi)]['token_accuracy']:.1%} "
                     f"| {r['train_s']:.0f} |")
    return "\n".join(lines)


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`old` with each case of `new` replaced in place (or appended), in CASES order otherwise kept."""
    fresh = {r["case"]: r for r in new}
    merged = [fresh.pop(r["case"], r) for r in old]
    return merged + [r for r in new if r["case"] in fresh]


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("copy: position encodings (train lengths 1..L)", lambda r: r["task"] == "copy"),
              ("recall / addition / phonebook (the whole fixed book, one point):\n"
               "dense vs MoE (matched active FLOPs)", lambda r: r["task"] != "copy"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, keep) in zip(axes, panels):
        for r in filter(keep, rows):
            lengths = [int(n) for n in r["by_length"]]
            ax.plot(lengths, [r["by_length"][str(n)]["accuracy"] for n in lengths], marker="o",
                    linestyle="--" if r["experts"] else "-", label=r["case"])
            ax.axvline(r["train_lengths"][1], color="grey", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("example length n (grey: longest trained length L)")
        ax.set_ylabel("exact-match accuracy")
        ax.set_title(title, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax's INFO lines drown the table
    unknown = [c for c in FLAGS.cases if c not in CASES]
    if unknown:
        raise app.UsageError(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    if FLAGS.replot:
        with open(FLAGS.out) as f:
            results = json.load(f)
        for path in FLAGS.merge:
            with open(path) as f:
                results["rows"] = merge_rows(results["rows"], json.load(f)["rows"])
        if FLAGS.merge:
            write_results(FLAGS.out, results)
        print(table(results["rows"]))
        plot(results["rows"], os.path.splitext(FLAGS.out)[0] + ".png")
        return
    rows = []
    for name in FLAGS.cases:
        row = run_case(name, *CASES[name])
        rows.append(row)
        accs = ", ".join(f"{n}: {v['accuracy']:.3f}" for n, v in row["by_length"].items())
        print(f"{name}: {accs} ({row['train_s']:.0f} s)", flush=True)
    for task in ("recall", "addition", "phonebook"):  # the MoE twin must match the dense model's active compute
        dense, moe = (next((r for r in rows if r["case"] == f"{task}_{k}"), None) for k in ("dense", "moe"))
        if dense and moe and dense["train_flops_per_token"] != moe["train_flops_per_token"]:
            print(f"warning: {task} MoE FLOPs/token {moe['train_flops_per_token']:.4g} != dense "
                  f"{dense['train_flops_per_token']:.4g}", flush=True)
    if os.path.exists(FLAGS.out):  # keep the cases not rerun
        with open(FLAGS.out) as f:
            rows = merge_rows(json.load(f)["rows"], rows)
    print("\n### Exact-match accuracy by example length (one seed)\n")
    print(table(rows))
    write_results(FLAGS.out, {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
                              "eval_batches": FLAGS.eval_batches, "rows": rows})
    plot(rows, os.path.splitext(FLAGS.out)[0] + ".png")


if __name__ == "__main__":
    app.run(main)
