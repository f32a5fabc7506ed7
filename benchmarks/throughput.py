"""Training throughput and MFU against a matmul peak measured in the same run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/throughput.py [--steps 8]

For each model (the tiny_cpu demo, a 4-layer d_model=512 seq=512 model) and mesh ((8,1,1),
(2,4,1)): step time, tokens/s, model FLOPs/token (6N + attention + head) and MFU = achieved
FLOP/s / peak FLOP/s, where the peak is a jitted large fp32 matmul sharded over the same devices.
Also the time from launch to first step: cold (empty compile cache) and warm (cache filled).
Prints a table and writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm.train.metrics import measure_matmul_peak  # noqa: E402
from gqlm.train.timing import time_train_steps, write_results  # noqa: E402

flags.DEFINE_integer("steps", 8, "Timed steps per case (after 2 warm-up steps).")
flags.DEFINE_string("out", "benchmarks/results/throughput.json", "JSON output.")
flags.DEFINE_bool("compile_time", True, "Also measure launch-to-first-step, cold and cached.")
FLAGS = flags.FLAGS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {
    "tiny_cpu": ("experiments/tiny_cpu.py", {}),
    "d512_seq512": ("experiments/dense.py:d512", {"data.seq_len": "512", "data.batch_size": "16",
                                                   "data.corpus": "shakespeare"}),
}
MESHES = [(8, 1, 1), (2, 4, 1)]


def measure_training(experiment: str, overrides: dict[str, str], mesh: tuple[int, int, int], steps: int) -> dict:
    config = config_lib.load_experiment(os.path.join(ROOT, experiment))
    data, fsdp, tensor = mesh
    config = config_lib.apply_overrides(config, {**overrides, "mesh.data": str(data), "mesh.fsdp": str(fsdp),
                                                 "mesh.tensor": str(tensor), "optimizer.warmup_steps": "1"})
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
    peaks = [measure_matmul_peak()]
    rows = []
    for name, (experiment, overrides) in MODELS.items():
        for mesh in MESHES:
            rows.append(dict(measure_training(experiment, overrides, mesh, FLAGS.steps), model=name, mesh=list(mesh)))
    # The peak is measured before and after the cases and the higher reading kept: on a shared
    # machine a single low reading would inflate every MFU.
    peaks.append(measure_matmul_peak())
    peak = max(peaks)
    results.update(matmul_peak_flops=peak, matmul_peak_readings=peaks, cases=rows)
    print(f"measured fp32 matmul peak over {jax.device_count()} devices: {peak / 1e9:.1f} GFLOP/s "
          f"(readings {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(f"{'model':<12} {'mesh':<10} {'step s':>8} {'tok/s':>9} {'GFLOP/tok':>10} {'MFU':>6}")
    for row in rows:
        row["mfu"] = row["model_flops_per_s"] / peak
        print(f"{row['model']:<12} {str(tuple(row['mesh'])):<10} {row['step_time_s']:>8.3f} "
              f"{row['tokens_per_s']:>9.0f} {row['flops_per_token'] / 1e9:>10.4f} {row['mfu']:>6.1%}")
    if FLAGS.compile_time:
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = launch_to_first_step(cache), launch_to_first_step(cache)
        results["launch_to_first_step_s"] = {"cold_cache": cold, "warm_cache": warm}
        print(f"launch to first step (smoke config, whole process): cold {cold:.1f} s, cached {warm:.1f} s")
    write_results(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
