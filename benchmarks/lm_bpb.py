"""The comparison LM of benchmarks/tokenizer_comparison.py (experiments/gqvae_lm_compare.py, the
same training bytes for every tokenizer), run as `python -m gqlm.train` once per seed."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = "experiments/gqvae_lm_compare.py"


def compare_module():
    """experiments/gqvae_lm_compare.py as a module (its budget constants)."""
    exp = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, COMPARE))
    module = importlib.util.module_from_spec(exp)
    exp.loader.exec_module(module)
    return module


def train_lm(lm_dir: str, name: str, spec: str, bpt: float, seed: int = 0) -> dict[str, Any]:
    """Runs the comparison LM with `seed` in lm_dir/name[_seedS]; returns its final validation metrics
    (reused if already run)."""
    workdir = os.path.join(lm_dir, name if seed == 0 else f"{name}_seed{seed}")
    module = compare_module()
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
        cmd = [sys.executable, "-m", "gqlm.train", f"--config={COMPARE}:{spec},bpt={bpt:.4f}", f"--workdir={workdir}",
               f"--config.seed={seed}"]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            return {"lm_error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    row = final()
    seq_len = max(8, round(module.BYTE_CONTEXT / bpt))
    return {"seed": seed, "val_bpb": row["bpb"], "val_loss": row["loss"], "lm_seq_len": seq_len,
            "lm_wall_s": wall and round(wall, 1), "lm_steps": module.STEPS, "lm_batch": module.BATCH,
            "lm_train_bytes": module.STEPS * module.BATCH * seq_len * bpt}


def lm_seeds(row: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's LM results over seeds: the first run's fields, val_bpb their mean, each seed's kept."""
    for res in results:
        print(f"{row['kind']} {row['vocab_size']}: LM {res}", flush=True)
    failed = [res for res in results if "lm_error" in res]
    if failed:
        return failed[0]
    bpbs = [res["val_bpb"] for res in results]
    return {**results[0], "val_bpb": statistics.mean(bpbs), "val_bpb_seeds": bpbs,
            "val_bpb_std": statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0,
            "lm_seeds": [res["seed"] for res in results], "lm_wall_s": [res["lm_wall_s"] for res in results]}
