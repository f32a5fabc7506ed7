"""Long-run stability: the demo trained for thousands of steps with frequent checkpoints and evals.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/soak.py [--steps 2000]

Runs the real training loop (`gqlm.train.loop.train`) on the demo shrunk, experiments/tiny_cpu.py:smoke
(the full demo: --config experiments/tiny_cpu.py, ~0.5-2.5 s/step on 2 busy cores),
with a checkpoint every 100 steps and an eval every 200. Reports resident memory (RSS) after
warm-up (the first step after the first eval and checkpoint, when every program is compiled) and
at the end, which must not grow by more than 5%; the time the loop blocks in each checkpoint save,
the manifest (CRC-32) write, and restores of the final checkpoint with and without verification:
after one untimed restore (orbax start-up), `--restore_rounds` rounds in alternating order (verified
first, then unverified first, ...), each restore through a fresh checkpoint manager as a resumed run
does; the medians are reported, so neither is favoured by running first.
Prints a table and writes benchmarks/results/soak.json; exits 1 if memory grew too much.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set

import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm.data.pipeline import make_train_iterator  # noqa: E402
from gqlm.train import checkpoint as ckpt_lib  # noqa: E402
from gqlm.train import loop  # noqa: E402
from gqlm.train.experiment import build_experiment  # noqa: E402
from gqlm.train.tasks.lm import LMTask  # noqa: E402
from timing import time_alternating, write_results  # noqa: E402

flags.DEFINE_string("config", "experiments/tiny_cpu.py:smoke", "Experiment to soak (the demo, shrunk).")
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("eval_every", 200, "Steps between evaluations.")
flags.DEFINE_integer("sample_every", 50, "Steps between RSS samples.")
flags.DEFINE_integer("restore_rounds", 8, "Rounds of (verified, unverified) restores, alternating which goes first.")
flags.DEFINE_float("max_growth", 0.05, "Allowed RSS growth from warm-up to the end.")
flags.DEFINE_string("out", "benchmarks/results/soak.json", "JSON output.")
FLAGS = flags.FLAGS


def rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/status)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/status") as f:
            kib = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
        return int(kib) * 1024


class Probe:
    """Wraps the loop's per-step report and the checkpoint save / manifest write to measure them."""

    def __init__(self, sample_every: int):
        self.rss: list[tuple[int, int]] = []  # (step, bytes)
        self.save_s: list[float] = []
        self.manifest_s: list[float] = []
        report, save, manifest = loop.report, ckpt_lib.Checkpointer.save, ckpt_lib.write_manifest

        def sampled_report(pending, *args, **kwargs):
            if pending[0] % sample_every == 0:
                self.rss.append((pending[0], rss_bytes()))
            return report(pending, *args, **kwargs)

        def timed(fn, into):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                into.append(time.perf_counter() - start)
                return out
            return wrapper

        loop.report = sampled_report
        ckpt_lib.Checkpointer.save = timed(save, self.save_s)
        ckpt_lib.write_manifest = timed(manifest, self.manifest_s)


def restore_cases(config, workdir: str) -> dict[str, Callable[[], tuple[int, float]]]:
    """Restores of the latest checkpoint of `workdir`, with and without checking its manifest: each
    call opens a fresh manager (as a resumed run does) and returns (restored step, seconds)."""
    exp = build_experiment(config, LMTask())
    data_iter = make_train_iterator(exp.config, exp.tokenizer)

    def restore(verify: bool) -> tuple[int, float]:
        train_cfg = config_lib.apply_override_strings(exp.config.copy_and_resolve_references(),
                                                      {"train.verify_checkpoints": str(verify)}).train
        with jax.set_mesh(exp.mesh), ckpt_lib.Checkpointer(workdir, train_cfg) as checkpointer:
            start = time.perf_counter()
            state = checkpointer.restore_latest(exp.abstract, data_iter)
            jax.block_until_ready(state)
            return int(state.step), time.perf_counter() - start

    return {"verified": lambda: restore(True), "unverified": lambda: restore(False)}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main(argv: list[str]) -> None:
    config = config_lib.apply_override_strings(config_lib.load_experiment(FLAGS.config), {
        "train.steps": str(FLAGS.steps), "train.checkpoint_every": str(FLAGS.checkpoint_every),
        "train.eval_every": str(FLAGS.eval_every), "train.log_every": str(FLAGS.sample_every),
        "train.sample_tokens": "0", "train.progress": "False"})
    probe = Probe(FLAGS.sample_every)
    load_start = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="gqlm_soak_")
    try:
        start = time.perf_counter()
        metrics = loop.train(config, workdir, LMTask())
        wall = time.perf_counter() - start
        end_rss = rss_bytes()
        latest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
        step_dir = os.path.join(workdir, "checkpoints", str(latest))
        verify_start = time.perf_counter()
        problem = ckpt_lib.check_manifest(step_dir)
        verify_s = time.perf_counter() - verify_start
        cases = restore_cases(config, workdir)
        cases["verified"]()  # untimed: orbax's first restore in the process pays its start-up
        restores = time_alternating(cases, FLAGS.restore_rounds)
        checkpoint_mib = dir_bytes(step_dir) / 2**20
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    warm_step = min(max(FLAGS.eval_every, FLAGS.checkpoint_every) + 1, FLAGS.steps // 2)
    warm = next(((s, b) for s, b in probe.rss if s >= warm_step), probe.rss[0])
    last = probe.rss[-1]
    growth = (last[1] - warm[1]) / warm[1]
    restored_steps = {step for case in restores.values() for step, _ in case}
    restore_s = {name: [seconds for _, seconds in case] for name, case in restores.items()}
    restore_median = {name: statistics.median(times) for name, times in restore_s.items()}
    result = {
        "config": FLAGS.config, "steps": FLAGS.steps, "checkpoint_every": FLAGS.checkpoint_every,
        "eval_every": FLAGS.eval_every, "devices": jax.device_count(), "cores": os.cpu_count(),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]}, "wall_s": wall,
        "steps_per_s": FLAGS.steps / wall, "final_validation": metrics,
        "rss_samples": [{"step": s, "mib": b / 2**20} for s, b in probe.rss],
        "rss_warm": {"step": warm[0], "mib": warm[1] / 2**20}, "rss_end": {"step": last[0], "mib": last[1] / 2**20},
        "rss_after_run_mib": end_rss / 2**20, "rss_growth": growth, "max_growth": FLAGS.max_growth,
        "memory_ok": growth < FLAGS.max_growth,
        "checkpoints_saved": len(probe.save_s), "checkpoint_mib": checkpoint_mib,
        "save_blocking_s": {"first": probe.save_s[0], "median": statistics.median(probe.save_s),
                            "max": max(probe.save_s)},
        "manifest_write_s": {"mean": statistics.mean(probe.manifest_s) if probe.manifest_s else None,
                             "max": max(probe.manifest_s, default=None)},
        "verify_s": verify_s, "manifest_ok": problem is None,
        "restore_rounds": FLAGS.restore_rounds, "restore_order": "alternating: verified first in even rounds",
        "restore_s": restore_s, "restore_median_s": restore_median, "restored_steps": sorted(restored_steps),
    }
    rows = [
        ("steps (wall, steps/s)", f"{FLAGS.steps} ({wall:.0f} s, {FLAGS.steps / wall:.1f}/s)"),
        ("final validation bpb", f"{metrics.get('bpb', float('nan')):.3f}"),
        (f"RSS after warm-up (step {warm[0]})", f"{warm[1] / 2**20:.1f} MiB"),
        (f"RSS at end (step {last[0]})", f"{last[1] / 2**20:.1f} MiB"),
        ("RSS growth", f"{100 * growth:+.2f}% (limit {100 * FLAGS.max_growth:.0f}%): "
                       f"{'ok' if result['memory_ok'] else 'TOO MUCH'}"),
        ("checkpoints (size each)", f"{len(probe.save_s)} ({checkpoint_mib:.2f} MiB)"),
        ("save: loop blocked, first / median / max", f"{1e3 * probe.save_s[0]:.0f} / "
         f"{1e3 * statistics.median(probe.save_s):.0f} / {1e3 * max(probe.save_s):.0f} ms"),
        ("manifest write (CRC-32), mean", f"{1e3 * statistics.mean(probe.manifest_s):.1f} ms"
         if probe.manifest_s else "-"),
        ("verify latest manifest", f"{1e3 * verify_s:.1f} ms ({'ok' if problem is None else problem})"),
        (f"restore latest, verified / not (median of {FLAGS.restore_rounds}, alternating)",
         f"{restore_median['verified']:.3f} / {restore_median['unverified']:.3f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    write_results(FLAGS.out, result)
    if not result["memory_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
