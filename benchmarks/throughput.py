"""Training throughput and MFU against a matmul peak measured in the same run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/throughput.py [--steps 8]

For each model of `--models` (default: the tiny_cpu demo, a 4-layer d_model=512 seq=512 model) and
mesh of `--meshes` (default (8,1,1), (2,4,1)): step time, tokens/s, model FLOPs/token (6N +
attention + head) and MFU = achieved FLOP/s / peak FLOP/s, where the peak is a jitted large
matmul (`--peak_dtype`) sharded over the same devices, and, where the device kind is known, also
against its datasheet bf16 peak. Also the time from launch to first step: cold (empty compile
cache) and warm (cache filled). Prints a table and writes benchmarks/results/throughput.json.

On one GPU (the bf16 GPT-2-small-shaped models, dense and 8-expert MoE with the same active FLOPs):

    python benchmarks/throughput.py --models=125m_bf16,125m_bf16_cudnn,moe_8x125m_bf16_cudnn --meshes=1x1x1 \
      --peak_dtype=bfloat16 --peak_size=8192 --compile_time=false --out benchmarks/results/throughput_gpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set


import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm.train.metrics import datasheet_peak_flops, measure_matmul_peak  # noqa: E402
from timing import mesh_overrides, parse_mesh, time_train_steps, write_results  # noqa: E402

flags.DEFINE_integer("steps", 8, "Timed steps per case (after 2 warm-up steps).")
flags.DEFINE_string("out", "benchmarks/results/throughput.json", "JSON output.")
flags.DEFINE_bool("compile_time", True, "Also measure launch-to-first-step, cold and cached.")
flags.DEFINE_list("models", ["tiny_cpu", "d512_seq512"], "Models of MODELS to time.")
flags.DEFINE_list("meshes", ["8x1x1", "2x4x1"], "Meshes as DATAxFSDPxTENSOR.")
flags.DEFINE_integer("peak_size", 2048, "n of the measured [n*devices, n] x [n, n] matmul (8192 on a GPU).")
flags.DEFINE_enum("peak_dtype", "float32", ["float32", "bfloat16"], "dtype of the measured matmul peak.")
FLAGS = flags.FLAGS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {
    "tiny_cpu": ("experiments/tiny_cpu.py", {}),
    "d512_seq512": ("experiments/dense.py:d512", {"data.seq_len": "512", "data.batch_size": "16",
                                                   "data.corpus": "shakespeare"}),
}
# Accelerator-sized models: Shakespeare bytes (no corpus build or BPE training), bf16 compute.
_GPU = {"data.corpus": "shakespeare", "data.tokenizer": "byte", "data.seq_len": "1024", "data.batch_size": "32",
        "model.compute_dtype": "bfloat16"}
MODELS.update({
    "125m_bf16": ("experiments/dense_125m.py", {**_GPU, "model.attention_impl": "einsum"}),
    "125m_bf16_cudnn": ("experiments/dense_125m.py", {**_GPU, "model.attention_impl": "cudnn"}),
    "350m_bf16_cudnn": ("experiments/dense.py:350m", {**_GPU, "model.attention_impl": "cudnn"}),
    "moe_8x125m_bf16_cudnn": ("experiments/moe_8x125m.py", {**_GPU, "model.attention_impl": "cudnn",
                                                             "mesh.expert": "1"}),
})


def measure_training(experiment: str, overrides: dict[str, str], mesh: tuple[int, int, int], steps: int) -> dict:
    config = config_lib.load_experiment(os.path.join(ROOT, experiment))
    config = config_lib.apply_override_strings(config, {**overrides, **mesh_overrides(mesh), "optimizer.warmup_steps": "1"})
    return time_train_steps(config, steps)


def launch_to_first_step(cache_dir: str) -> float:
    """Seconds for `python -m gqlm.train` to finish one step of the smoke config (a fresh process)."""
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gqlm.train", "--config", "experiments/tiny_cpu.py:smoke",
                        "--workdir", workdir, "--config.train.steps=1", "--config.train.sample_tokens=0",
                        f"--config.train.compile_cache_dir={cache_dir}"], cwd=ROOT, check=True,
                       capture_output=True)
        return time.perf_counter() - start


def main(argv):
    results = {"devices": jax.device_count(), "platform": jax.devices()[0].platform}
    unknown = [m for m in FLAGS.models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    meshes = [parse_mesh(text) for text in FLAGS.meshes]
    peak_dtype = jnp.dtype(FLAGS.peak_dtype)
    peaks = [measure_matmul_peak(FLAGS.peak_size, dtype=peak_dtype)]
    rows = []
    for name in FLAGS.models:
        experiment, overrides = MODELS[name]
        for mesh in meshes:
            try:
                row = measure_training(experiment, overrides, mesh, FLAGS.steps)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory on a small device: report, go on
                print(f"{name} {mesh}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                results.setdefault("failed", []).append(dict(model=name, mesh=list(mesh), error=str(e)[:2000]))
                continue
            rows.append(dict(row, model=name, mesh=list(mesh)))
            print(f"{name} {mesh}: {row['step_time_s']:.4f} s/step", flush=True)
    # The peak is measured before and after the cases and the higher reading kept: on a shared
    # machine a single low reading would inflate every MFU.
    peaks.append(measure_matmul_peak(FLAGS.peak_size, dtype=peak_dtype))
    peak = max(peaks)
    datasheet = datasheet_peak_flops(jax.devices()[0].device_kind)
    datasheet = datasheet * jax.device_count() if datasheet else None
    results.update(matmul_peak_flops=peak, matmul_peak_readings=peaks, matmul_peak_dtype=FLAGS.peak_dtype,
                   device_kind=jax.devices()[0].device_kind, datasheet_peak_flops=datasheet, cases=rows)
    print(f"measured {FLAGS.peak_dtype} matmul peak over {jax.device_count()} {jax.devices()[0].device_kind} "
          f"devices: {peak / 1e9:.1f} GFLOP/s (readings {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(f"{'model':<16} {'mesh':<10} {'step s':>8} {'tok/s':>9} {'GFLOP/tok':>10} {'MFU':>6} {'MFU(sheet)':>10}")
    for row in rows:
        row["mfu"] = row["model_flops_per_s"] / peak
        row["mfu_datasheet"] = row["model_flops_per_s"] / datasheet if datasheet else None
        sheet = f"{row['mfu_datasheet']:.1%}" if datasheet else "-"
        print(f"{row['model']:<16} {str(tuple(row['mesh'])):<10} {row['step_time_s']:>8.4f} "
              f"{row['tokens_per_s']:>9.0f} {row['flops_per_token'] / 1e9:>10.4f} {row['mfu']:>6.1%} {sheet:>10}")
    if FLAGS.compile_time:
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = launch_to_first_step(cache), launch_to_first_step(cache)
        results["launch_to_first_step_s"] = {"cold_cache": cold, "warm_cache": warm}
        print(f"launch to first step (smoke config, whole process): cold {cold:.1f} s, cached {warm:.1f} s")
    write_results(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
