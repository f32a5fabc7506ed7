"""Byte vs BPE vs VQ-VAE vs GQ-VAE tokenizers on held-out Shakespeare: compression, speed, LM bpb.

    python -m gqlm.train --config experiments/gqvae_shakespeare.py --workdir workdirs/gqvae
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:v8k --workdir workdirs/gqvae_8k --stop_at_step 800
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:vqvae --workdir workdirs/vqvae
    PYTHONPATH=. python benchmarks/tokenizer_comparison.py [--vocab_sizes 1024,4096,8192] [--lm=false] \
      [--checkpoints vqvae=workdirs/vqvae,gqvae400=workdirs/gqvae,gqvae16k=workdirs/gqvae_8k]

Every `--checkpoints` entry NAME=WORKDIR is a row kind (a GQ-VAE, or a VQ-VAE: fixed gates), built
at every vocabulary size; byte and BPE rows come with them.

For each tokenizer and vocabulary size: bytes per token on the validation split (whole plays,
both editions, that no tokenizer was built from: the run checks no document is in both splits);
encode MB/s on the whole split by a freshly loaded tokenizer (jit compile excluded), with its
caches as shipped and without them: VQ/GQ-VAE with the table of the train split's pretokens saved
with the tokenizer (only the pretokens it lacks run the model) and without it (each distinct
pretoken of the encode runs the model once); BPE with HF's word cache (empty at load) and with it
off; the byte tokenizer has none. `--repeats` cold encodes of each condition, in alternating order
(medians), then warm: the same text again after each cached encode. Rows of VQ/GQ-VAE record how
much of the split the table covers (`table_hit_fraction`, `model_bytes_with_table` /
`model_bytes_no_table`: bytes of distinct pretokens the model runs). With --lm, the validation bits
per byte of the same small LM trained on each tokenizer with the same number of training bytes
(experiments/gqvae_lm_compare.py, run as `python -m gqlm.train`), once per `--lm_seeds` seed (init and
data order; the row's val_bpb is their mean, each seed's kept).
Encode speed alone, from briefly CPU-trained models of the GPU models' shapes (speed depends on the
model's shape, not its training; bytes/token of such models means nothing):

    python -m gqlm.train --config experiments/gqvae_shakespeare.py --workdir workdirs/tokspeed/gqvae4k \
      --config.train.steps=30
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:codebook=16384 \
      --workdir workdirs/tokspeed/gqvae16k --config.train.steps=30
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:vqvae --workdir workdirs/tokspeed/vqvae \
      --config.train.steps=10
    PYTHONPATH=. python benchmarks/tokenizer_comparison.py --lm=false --vocab_sizes 1024,4096 \
      --checkpoints vqvae=workdirs/tokspeed/vqvae,gqvae4k=workdirs/tokspeed/gqvae4k,gqvae16k=workdirs/tokspeed/gqvae16k \
      --tok_dir workdirs/tokspeed/tok --out benchmarks/results/tokenizers_speed.json

Tokenizers are built once into --tok_dir (BPE trained on the train split; VQ/GQ-VAE vocabularies
and pretoken tables built from the checkpoints on the train split) and reused; a VQ/GQ-VAE
directory saved before tables existed gets its table added (its encodings do not change). A vocabulary the checkpoint cannot fill
is reported as an error row. Encode speed is given per wall second and per CPU-second of this
process (time.process_time, XLA's threads included), as the 2 cores are shared. VQ/GQ-VAE encoding
spreads its model batches over this process's CPU devices, one per core at most (`--cpu_devices`,
default 8 as in gqlm.train; `--cpu_devices=1` keeps it on one core); rows record `model_devices`. --reuse_measurements
merges earlier runs' rows (e.g. one run per checkpoint) before the LM runs (finished ones are
reused from --lm_dir). Writes --out (JSON) and, with --lm, the PNG beside it; prints a markdown table.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from absl import app, flags

from gqlm.config import ConfigError, base_config
from gqlm.data import corpora
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.bpe import BPETokenizer
from lm_bpb import compare_module, lm_seeds, train_lm
from timing import time_alternating, write_results

flags.DEFINE_list("checkpoints", ["vqvae=workdirs/vqvae", "gqvae400=workdirs/gqvae", "gqvae16k=workdirs/gqvae_8k"],
                  "NAME=WORKDIR of trained GQ-VAE / VQ-VAE (fixed-gate) models; NAME labels their rows")
flags.DEFINE_list("vocab_sizes", ["1024", "4096", "8192"], "vocabulary sizes to compare")
flags.DEFINE_string("tok_dir", "workdirs/tok", "where built tokenizers are kept")
flags.DEFINE_string("lm_dir", "workdirs/lm", "LM workdirs of the bpb comparison")
flags.DEFINE_bool("lm", True, "also train the comparison LM on each tokenizer")
flags.DEFINE_integer("parallel", 2, "LM runs at a time")
flags.DEFINE_list("lm_seeds", ["0"], "config.seed of the LM runs (init and data order); val_bpb is their mean")
flags.DEFINE_list("reuse_measurements", [], "previous --out JSONs: take their tokenizer rows (the first of each "
                  "kind and size) instead of building/measuring those again")
flags.DEFINE_string("out", "benchmarks/results/tokenizers.json", "JSON output (PNG beside it)")
flags.DEFINE_integer("repeats", 4, "cold encodes with caches and as many without, alternating which goes first")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices of this process (as gqlm.train's 8 fake devices): VQ/GQ-VAE "
                     "encoding spreads its model batches over min(devices, cores); 1 = one core")
FLAGS = flags.FLAGS



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
        from gqlm.train.tasks.gqvae.checkpoint import load_checkpoint
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


def fresh(spec: str, caches: bool) -> tuple[Any, float]:
    """A freshly loaded tokenizer with its jit shapes compiled (seconds spent compiling), with or
    without its caches: a VQ/GQ-VAE without its saved pretoken table, a BPE with HF's word cache
    off (capacity 0 stores nothing). The byte tokenizer has none."""
    if spec.startswith("gqvae:"):
        from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
        tok = GQVAETokenizer.load(spec.split(":", 1)[1], table=caches)
        t0 = time.perf_counter()
        tok.precompile()  # every bucket shape (compiled once per process: later loads share them)
        return tok, time.perf_counter() - t0
    tok = load_tokenizer(spec)
    if spec.startswith("bpe:") and not caches:
        hf = tok.hf_tokenizer()
        hf.model._resize_cache(0)
        tok = BPETokenizer(hf)
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


class ColdEncodes:
    """Encodes of `texts` by freshly loaded copies of one tokenizer, each checked to give the ids
    of the first (which must decode back to `texts`): caches change speed, never encodings."""

    def __init__(self, spec: str, texts: list[str]):
        self.spec, self.texts = spec, texts
        self.ids: list[list[int]] | None = None
        self.tok: Any = None
        self.compile_s = 0.0

    def run(self, caches: bool) -> dict[str, float]:
        """Seconds (wall, CPU) of a cold encode; with caches also of the same texts again (warm)."""
        tok, compile_s = fresh(self.spec, caches)
        ids, wall, cpu = timed_encode(tok, self.texts)
        if self.ids is None:
            assert all(tok.decode(i) == t for i, t in zip(ids, self.texts)), f"{self.spec} is not lossless"
            self.ids, self.tok, self.compile_s = ids, tok, compile_s
        assert ids == self.ids, f"{self.spec}: encodings differ with caches={caches}"
        times = {"wall": wall, "cpu": cpu}
        if caches:
            again, times["warm_wall"], times["warm_cpu"] = timed_encode(tok, self.texts)
            assert again == ids
        return times


def table_coverage(spec: str, texts: list[str]) -> dict[str, float]:
    """How much of `texts` a VQ/GQ-VAE's saved pretoken table covers: the share of pretoken
    occurrences found there, and the bytes of distinct pretokens the model runs with and without it."""
    from gqlm.tokenizers.base import text_to_bytes
    from gqlm.tokenizers.gqvae.pretokenize import pretokens
    from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
    table = GQVAETokenizer.load(spec.split(":", 1)[1]).table()
    counts = collections.Counter(p for t in texts for p in pretokens(t))
    size = {p: len(text_to_bytes(p)) for p in counts}
    return {"table_hit_fraction": sum(n for p, n in counts.items() if p in table) / sum(counts.values()),
            "model_bytes_with_table": sum(n for p, n in size.items() if p not in table),
            "model_bytes_no_table": sum(size.values())}


def measure(spec: str, valid: list[str], train_head: str) -> dict[str, Any]:
    """Bytes/token and encode speed of `spec` on `valid`: --repeats cold encodes with its caches and
    as many without, in alternating order (medians), plus a warm encode after each cached one."""
    cold = ColdEncodes(spec, valid)
    runs = time_alternating({"cached": lambda: cold.run(True), "no_cache": lambda: cold.run(False)},
                            FLAGS.repeats)
    tok, ids = cold.tok, cold.ids
    sizes = tok.token_bytes()
    n_bytes = sum(int(sizes[i].sum()) for i in ids)
    n_tokens = sum(len(i) for i in ids)

    def mb_s(condition: str, key: str) -> float:
        return n_bytes / statistics.median(r[key] for r in runs[condition]) / 1e6

    row: dict[str, Any] = {"encode_repeats": FLAGS.repeats}
    if spec.startswith("gqvae:"):
        from gqlm.tokenizers.gqvae.tokenizer import model_devices
        row.update(model_devices=len(model_devices()), compile_s=cold.compile_s, **table_coverage(spec, valid))
    head = tok.encode(train_head)
    return {"vocab_size": tok.vocab_size, "bytes_per_token": n_bytes / n_tokens,
            "encode_mb_s": mb_s("cached", "wall"), "encode_mb_cpu_s": mb_s("cached", "cpu"),
            "encode_mb_s_no_cache": mb_s("no_cache", "wall"), "encode_mb_cpu_s_no_cache": mb_s("no_cache", "cpu"),
            "encode_mb_s_warm": mb_s("cached", "warm_wall"), "encode_mb_cpu_s_warm": mb_s("cached", "warm_cpu"),
            **row, "train_bytes_per_token": float(sizes[head].sum()) / len(head)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| tokenizer | vocab | bytes/token | cold encode MB/s, caches / none | per CPU-s, caches / none "
             "| warm MB/s | table hits | LM val bpb | LM seq_len (tokens) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['requested_vocab']} | - | - | - | - | - | - | {r['error']} |")
            continue
        bpb = f"{r['val_bpb']:.3f}" if "val_bpb" in r else r.get("lm_error", "-")
        seeds = len(r.get("val_bpb_seeds", []))
        bpb += f" ± {r['val_bpb_std']:.3f} ({seeds} seeds)" if seeds > 1 else ""
        speed = lambda key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
        hits = f"{100 * r['table_hit_fraction']:.1f}%" if "table_hit_fraction" in r else "-"
        lines.append(f"| {r['kind']} | {r['vocab_size']} | {r['bytes_per_token']:.3f} | "
                     f"{speed('encode_mb_s')} / {speed('encode_mb_s_no_cache')} | "
                     f"{speed('encode_mb_cpu_s')} / {speed('encode_mb_cpu_s_no_cache')} | {speed('encode_mb_s_warm')} | "
                     f"{hits} | {bpb} | {r.get('lm_seq_len', '-')} |")
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


ENCODE_TIMING = (
    "whole validation split (held-out plays) in one encode_batch by a freshly loaded tokenizer, jit compiled "
    "first; 'caches' = as shipped (VQ/GQ-VAE: the train split's pretoken table; BPE: HF's word cache, "
    "empty at load), 'no_cache' = VQ/GQ-VAE without the table (each distinct pretoken of the call runs "
    "the model once), BPE with the word cache off; warm = the same texts again after a cached encode; "
    "repeats in alternating order, medians; VQ/GQ-VAE model batches spread over model_devices CPU devices "
    "(one per core at most); MB/s on the wall clock and per CPU-second of this process (time.process_time)")
KEPT = ("kind", "requested_vocab", "spec", "vocab_size", "bytes_per_token", "encode_mb_s", "encode_mb_cpu_s",
        "encode_mb_s_no_cache", "encode_mb_cpu_s_no_cache", "encode_mb_s_warm", "encode_mb_cpu_s_warm",
        "encode_repeats", "table_hit_fraction", "model_bytes_with_table", "model_bytes_no_table", "compile_s",
        "model_devices", "train_bytes_per_token", "error")
REUSED: dict[str, str] = {}  # path of a reused --out -> its timing note (machine load while it measured)


def reused_rows(paths: list[str]) -> list[dict[str, Any]]:
    """The tokenizer rows of earlier --out JSONs (the first of each kind and size)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            earlier = json.load(f)
        REUSED[path] = earlier["meta"].get("encode_timing", "")
        for r in earlier["rows"]:
            if not any((r["kind"], r["requested_vocab"]) == (q["kind"], q["requested_vocab"]) for q in rows):
                rows.append({k: r[k] for k in KEPT if k in r})
    return rows


def measured_row(kind: str, vocab: int, train: list[str], valid: list[str], train_head: str) -> dict[str, Any]:
    """The row of one tokenizer (built if needed): its measurements, or the error building it."""
    row: dict[str, Any] = {"kind": kind, "requested_vocab": vocab}
    try:
        spec = build(kind, vocab, train)
        row.update(spec=spec, **measure(spec, valid, train_head))
        print(f"{kind} {vocab}: {row['bytes_per_token']:.3f} bytes/token, cold {row['encode_mb_s']:.2f} MB/s with "
              f"caches, {row['encode_mb_s_no_cache']:.2f} without, warm {row['encode_mb_s_warm']:.2f}", flush=True)
    except ConfigError as e:
        row["error"] = str(e)
        print(f"{kind} {vocab}: {e}", flush=True)
    return row


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
    compare = compare_module()
    train_head = "".join(train)[:compare.MEASURE_BYTES]  # what the experiment measures bytes/token on
    shared = set(train) & set(valid)
    assert not shared, f"{len(shared)} documents are in both splits"  # the tokenizers see the train split only
    cases = [("byte", 256)] + [(k, int(v)) for v in FLAGS.vocab_sizes for k in ("bpe", *checkpoints())]
    load_start = os.getloadavg()[0]
    rows = reused_rows(FLAGS.reuse_measurements)
    for kind, vocab in cases:
        if not any((kind, vocab) == (r["kind"], r["requested_vocab"]) for r in rows):
            rows.append(measured_row(kind, vocab, train, valid, train_head))
    order = ["byte", "bpe", *checkpoints()]
    rows.sort(key=lambda r: (r["requested_vocab"], order.index(r["kind"]) if r["kind"] in order else len(order)))
    if FLAGS.lm:
        todo = [r for r in rows if "error" not in r]
        seeds = [int(s) for s in FLAGS.lm_seeds]
        with ThreadPoolExecutor(FLAGS.parallel) as pool:
            runs = [(f"{r['kind']}_{r['requested_vocab']}", r["spec"], r["train_bytes_per_token"], s)
                    for r in todo for s in seeds]
            results = iter(list(pool.map(lambda a: train_lm(FLAGS.lm_dir, *a), runs)))
            for r in todo:
                r.update(lm_seeds(r, [next(results) for _ in seeds]))
    meta = {"corpus": "shakespeare", "validation_bytes": sum(len(t.encode("utf-8", "surrogateescape")) for t in valid),
            "validation_documents": len(valid), "documents_shared_with_train": 0,
            "encode_timing": ENCODE_TIMING + f"; machine load average {load_start:.1f} at the start, "
                             f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores",
            "lm_budget": f"same training bytes: {compare.STEPS} steps x {compare.BATCH} rows x ~{compare.BYTE_CONTEXT} "
                         f"bytes per row (seq_len = {compare.BYTE_CONTEXT} / bytes-per-token), tiny dense LM",
            "checkpoints": checkpoints(), "measurements_reused_from": REUSED}
    write_results(FLAGS.out, {"meta": meta, "rows": rows})
    if FLAGS.lm:
        plot(rows, os.path.splitext(FLAGS.out)[0] + ".png")
    print(markdown(rows))


if __name__ == "__main__":
    app.run(main)
