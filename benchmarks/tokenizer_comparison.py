"""Byte vs BPE vs VQ-VAE vs GQ-VAE tokenizers on held-out Shakespeare: compression, speed, LM bpb.

    python -m gqlm.train --config experiments/gqvae_shakespeare.py --workdir workdirs/gqvae
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:v8k --workdir workdirs/gqvae_8k --stop_at_step 800
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:vqvae --workdir workdirs/vqvae
    PYTHONPATH=. python benchmarks/tokenizer_comparison.py [--vocab_sizes 1024,4096,8192] [--lm=false] \
      [--checkpoints vqvae=workdirs/vqvae,gqvae400=workdirs/gqvae,gqvae16k=workdirs/gqvae_8k]

Every `--checkpoints` entry NAME=WORKDIR is a row kind (a GQ-VAE, or a VQ-VAE: fixed gates), built
at every vocabulary size; byte and BPE rows come with them.

For each tokenizer and vocabulary size: bytes per token on the validation split; encode MB/s on
the whole split, cold (a freshly loaded tokenizer, jit compile excluded: for VQ/GQ-VAE the
pretokens of the train split come from the table saved with the tokenizer, the held-out rest runs
the model), cached (the same text again) and, for VQ/GQ-VAE, with no table (every distinct
pretoken runs the model); and, with --lm, the validation bits per byte of the same small LM trained
on it with the same number of training bytes (experiments/gqvae_lm_compare.py, run as
`python -m gqlm.train`).
Tokenizers are built once into --tok_dir (BPE trained on the train split; VQ/GQ-VAE vocabularies
and pretoken tables built from the checkpoints on the train split) and reused; a VQ/GQ-VAE
directory saved before tables existed gets its table added (its encodings do not change). A vocabulary the checkpoint cannot fill
is reported as an error row. Encode speed is given per wall second and per CPU-second of this
process (time.process_time, XLA's threads included), as the 2 cores are shared. VQ/GQ-VAE encoding
spreads its model batches over this process's CPU devices, one per core at most (`--cpu_devices`,
default 8 as in gqlm.train; `--cpu_devices=1` keeps it on one core); rows record `model_devices`. --reuse_measurements
merges earlier runs' rows (e.g. one run per checkpoint) before the LM runs (finished ones are
reused from --lm_dir). Writes --out (JSON) and the PNG beside it; prints a markdown table.
"""

from __future__ import annotations

import os
import sys

# This file's name would shadow the HF `tokenizers` package when run as a script: drop its folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402

from gqlm.config import ConfigError, base_config  # noqa: E402
from gqlm.data import corpora  # noqa: E402
from gqlm.tokenizers import load_tokenizer  # noqa: E402

flags.DEFINE_list("checkpoints", ["vqvae=workdirs/vqvae", "gqvae400=workdirs/gqvae", "gqvae16k=workdirs/gqvae_8k"],
                  "NAME=WORKDIR of trained GQ-VAE / VQ-VAE (fixed-gate) models; NAME labels their rows")
flags.DEFINE_list("vocab_sizes", ["1024", "4096", "8192"], "vocabulary sizes to compare")
flags.DEFINE_string("tok_dir", "workdirs/tok", "where built tokenizers are kept")
flags.DEFINE_string("lm_dir", "workdirs/lm", "LM workdirs of the bpb comparison")
flags.DEFINE_bool("lm", True, "also train the comparison LM on each tokenizer")
flags.DEFINE_integer("parallel", 2, "LM runs at a time")
flags.DEFINE_list("reuse_measurements", [], "previous --out JSONs: take their tokenizer rows (the first of each "
                  "kind and size) instead of building/measuring those again")
flags.DEFINE_string("out", "benchmarks/results/tokenizers.json", "JSON output (PNG beside it)")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices of this process (as gqlm.train's 8 fake devices): VQ/GQ-VAE "
                     "encoding spreads its model batches over min(devices, cores); 1 = one core")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(_HERE)
COMPARE = "experiments/gqvae_lm_compare.py"


def build(kind: str, vocab: int, train: list[str]) -> str:
    """The tokenizer spec of `kind` at `vocab`, building it into --tok_dir if absent."""
    if kind == "byte":
        return "byte"
    out = os.path.join(FLAGS.tok_dir, f"{kind}_{vocab}")
    spec = f"{'bpe' if kind == 'bpe' else 'gqvae'}:{out}"
    if os.path.exists(os.path.join(out, "gqlm_tokenizer.json")):
        if kind != "bpe" and not os.path.exists(os.path.join(out, "pretokens.npz")):
            from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
            tok = GQVAETokenizer.load(out)
            print(f"{kind} {vocab}: adding the train split's pretoken table ({tok.remember(train)} pretokens)", flush=True)
            tok.save(out)
        return spec
    if kind == "bpe":
        from gqlm.tokenizers.bpe import train_bpe
        train_bpe(train, vocab, out)
    else:  # All sizes of a checkpoint from one segmentation of the train split (minutes on 2 cores).
        from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
        if (kind, vocab) not in _BUILT:
            ckpt = checkpoints()[kind]
            sizes = [int(v) for v in FLAGS.vocab_sizes]
            built = GQVAETokenizer.build_many(*load_checkpoint(ckpt), sizes, train, strict=False)
            _BUILT.update({(kind, v): t for v, t in built.items()})
        tok = _BUILT[kind, vocab]
        if isinstance(tok, ConfigError):
            raise tok
        tok.save(out)
    return spec


_BUILT: dict[tuple[str, int], Any] = {}  # (kind, vocab) -> tokenizer or the error building it


def checkpoints() -> dict[str, str]:
    """NAME -> WORKDIR of --checkpoints."""
    out = {}
    for entry in FLAGS.checkpoints:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path or name in ("byte", "bpe"):
            raise app.UsageError(f"--checkpoints entry {entry!r} is not NAME=WORKDIR (NAME not byte/bpe)")
        out[name] = path
    return out


def fresh(spec: str, **kwargs: Any) -> tuple[Any, float]:
    """A freshly loaded tokenizer with its jit shapes compiled (seconds spent compiling)."""
    if spec.startswith("gqvae:"):
        from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
        tok = GQVAETokenizer.load(spec.split(":", 1)[1], **kwargs)
        t0 = time.perf_counter()
        tok.precompile()  # every bucket shape (compiled once per process: later loads share them)
        return tok, time.perf_counter() - t0
    tok = load_tokenizer(spec)
    tok.encode("Warm up, the jit: compile is not encoding.")
    return tok, 0.0


def timed_encode(tok: Any, texts: list[str]) -> tuple[list[list[int]], float, float]:
    """(ids, wall seconds, this process's CPU seconds: on a shared machine, near the wall time an
    idle one would take). Garbage left by earlier steps is collected first: a collection of it
    inside the timed encode cost up to a third of the VQ-VAE's time."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    ids = tok.encode_batch(texts)
    return ids, time.perf_counter() - t0, time.process_time() - c0


def measure(spec: str, valid: list[str], train_head: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if spec.startswith("gqvae:"):  # No saved table: every distinct pretoken runs the model.
        from gqlm.tokenizers.gqvae.tokenizer import model_devices
        row["model_devices"] = len(model_devices())
        bare, row["compile_s"] = fresh(spec, table=False)
        bare_ids, seconds, cpu = timed_encode(bare, valid)
        n_bytes = sum(len(t.encode("utf-8", "surrogateescape")) for t in valid)
        row.update(encode_mb_s_no_table=n_bytes / seconds / 1e6, encode_mb_cpu_s_no_table=n_bytes / cpu / 1e6)
    tok, _ = fresh(spec)
    ids, seconds, cpu = timed_encode(tok, valid)
    sizes = tok.token_bytes()
    n_bytes = sum(int(sizes[i].sum()) for i in ids)
    n_tokens = sum(len(i) for i in ids)
    assert all(tok.decode(i) == t for i, t in zip(ids, valid)), f"{spec} is not lossless"
    assert not spec.startswith("gqvae:") or bare_ids == ids, f"{spec}: the table changes encodings"
    again, warm, warm_cpu = timed_encode(tok, valid)  # VQ/GQ-VAE's pretoken cache is now warm
    assert again == ids
    head = tok.encode(train_head)
    return {"vocab_size": tok.vocab_size, "bytes_per_token": n_bytes / n_tokens, "encode_mb_s": n_bytes / seconds / 1e6,
            "encode_mb_s_warm": n_bytes / warm / 1e6, "encode_mb_cpu_s": n_bytes / cpu / 1e6,
            "encode_mb_cpu_s_warm": n_bytes / warm_cpu / 1e6, **row,
            "train_bytes_per_token": float(sizes[head].sum()) / len(head)}


def train_lm(name: str, spec: str, bpt: float) -> dict[str, Any]:
    """Runs the comparison LM; returns its final validation metrics (reused if already run)."""
    workdir = os.path.join(FLAGS.lm_dir, name)
    exp = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, COMPARE))
    module = importlib.util.module_from_spec(exp)
    exp.loader.exec_module(module)
    metrics_file = os.path.join(workdir, "metrics.jsonl")

    def final():
        if not os.path.exists(metrics_file):
            return None
        rows = [json.loads(line) for line in open(metrics_file)]
        rows = [r for r in rows if r.get("split") == "validation" and r["step"] == module.STEPS]
        return rows[-1] if rows else None

    wall = None  # None: reused from an earlier run
    if final() is None:
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": ROOT}
        cmd = [sys.executable, "-m", "gqlm.train", f"--config={COMPARE}:{spec},bpt={bpt:.4f}", f"--workdir={workdir}"]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            return {"lm_error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    row = final()
    seq_len = max(8, round(module.BYTE_CONTEXT / bpt))
    return {"val_bpb": row["bpb"], "val_loss": row["loss"], "lm_seq_len": seq_len, "lm_wall_s": wall and round(wall, 1),
            "lm_steps": module.STEPS, "lm_batch": module.BATCH,
            "lm_train_bytes": module.STEPS * module.BATCH * seq_len * bpt}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| tokenizer | vocab | bytes/token | encode MB/s (cold / cached / no table) | cold MB per CPU-s "
             "| LM val bpb | LM seq_len (tokens) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['requested_vocab']} | - | - | - | - | {r['error']} |")
            continue
        bpb = f"{r['val_bpb']:.3f}" if "val_bpb" in r else r.get("lm_error", "-")
        warm = f" / {r['encode_mb_s_warm']:.2f}" if "encode_mb_s_warm" in r else ""
        warm += f" / {r['encode_mb_s_no_table']:.2f}" if "encode_mb_s_no_table" in r else ""
        lines.append(f"| {r['kind']} | {r['vocab_size']} | {r['bytes_per_token']:.3f} | {r['encode_mb_s']:.2f}{warm} | "
                     f"{r.get('encode_mb_cpu_s', float('nan')):.2f} | {bpb} | {r.get('lm_seq_len', '-')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind, marker in zip(kinds, "so^Dvx*+"):
        ok = [r for r in rows if r["kind"] == kind and "error" not in r]
        if not ok:
            continue
        axes[0].plot([r["vocab_size"] for r in ok], [r["bytes_per_token"] for r in ok], marker=marker, label=kind)
        lm = [r for r in ok if "val_bpb" in r]
        if lm:
            axes[1].plot([r["vocab_size"] for r in lm], [r["val_bpb"] for r in lm], marker=marker, label=kind)
    for ax, title in zip(axes, ("bytes per token (higher = more compression)", "LM validation bits/byte (lower = better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary size")
        ax.set_title(title, fontsize=10)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)  # before the backend starts
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax's INFO lines drown the table
    data = base_config().data
    data.corpus = "shakespeare"
    train = corpora.load_documents(data, "train")[:]
    valid = corpora.load_documents(data, "validation")[:]
    exp = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, COMPARE))
    compare = importlib.util.module_from_spec(exp)
    exp.loader.exec_module(compare)
    train_head = "".join(train)[:compare.MEASURE_BYTES]  # what the experiment measures bytes/token on
    cases = [("byte", 256)] + [(k, int(v)) for v in FLAGS.vocab_sizes for k in ("bpe", *checkpoints())]
    load_start = os.getloadavg()[0]
    rows, specs = [], {}
    keep = ("kind", "requested_vocab", "spec", "vocab_size", "bytes_per_token", "encode_mb_s",
            "encode_mb_s_warm", "encode_mb_s_no_table", "encode_mb_cpu_s", "encode_mb_cpu_s_warm",
            "encode_mb_cpu_s_no_table", "compile_s", "model_devices", "train_bytes_per_token", "error")
    reused = {}  # path -> its timing note (machine load while it measured)
    for path in FLAGS.reuse_measurements:
        with open(path) as f:
            earlier = json.load(f)
        reused[path] = earlier["meta"].get("encode_timing", "")
        for r in earlier["rows"]:
            if not any((r["kind"], r["requested_vocab"]) == (q["kind"], q["requested_vocab"]) for q in rows):
                rows.append({k: r[k] for k in keep if k in r})
    cases = [c for c in cases if not any(c == (r["kind"], r["requested_vocab"]) for r in rows)]
    for kind, vocab in cases:
        row: dict[str, Any] = {"kind": kind, "requested_vocab": vocab}
        try:
            specs[kind, vocab] = spec = build(kind, vocab, train)
            row.update(spec=spec, **measure(spec, valid, train_head))
            speeds = "/".join(f"{row[k]:.2f}" for k in ("encode_mb_s", "encode_mb_s_warm", "encode_mb_s_no_table") if k in row)
            print(f"{kind} {vocab}: {row['bytes_per_token']:.3f} bytes/token, {speeds} MB/s (cold/cached/no table)",
                  flush=True)
        except ConfigError as e:
            row["error"] = str(e)
            print(f"{kind} {vocab}: {e}", flush=True)
        rows.append(row)
    order = ["byte", "bpe", *checkpoints()]
    rows.sort(key=lambda r: (r["requested_vocab"], order.index(r["kind"]) if r["kind"] in order else len(order)))
    if FLAGS.lm:
        todo = [r for r in rows if "error" not in r]
        with ThreadPoolExecutor(FLAGS.parallel) as pool:
            names = [f"{r['kind']}_{r['requested_vocab']}" for r in todo]
            results = pool.map(lambda a: train_lm(*a), [(n, r["spec"], r["train_bytes_per_token"])
                                                         for n, r in zip(names, todo)])
            for r, res in zip(todo, results):
                r.update(res)
                print(f"{r['kind']} {r['vocab_size']}: LM {res}", flush=True)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    meta = {"corpus": "shakespeare", "validation_bytes": sum(len(t.encode("utf-8", "surrogateescape")) for t in valid),
            "encode_timing": "whole validation split in one encode_batch; cold = fresh load, jit compiled first; "
                             "VQ/GQ-VAE model batches spread over model_devices CPU devices (one per core at most); "
                             f"MB/s on the wall clock and per CPU-second of this process (time.process_time); "
                             f"machine load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
                             f"the end, on {os.cpu_count()} cores",
            "lm_budget": f"same training bytes: {compare.STEPS} steps x {compare.BATCH} rows x ~{compare.BYTE_CONTEXT} "
                         f"bytes per row (seq_len = {compare.BYTE_CONTEXT} / bytes-per-token), tiny dense LM",
            "checkpoints": checkpoints(), "measurements_reused_from": reused}
    with open(FLAGS.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, os.path.splitext(FLAGS.out)[0] + ".png")
    print(markdown(rows))


if __name__ == "__main__":
    app.run(main)
