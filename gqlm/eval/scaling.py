"""Scaling-law and loss-to-loss fits, compute-optimal allocation, plots, and a sweep driver.

* L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3): the Huber loss
  (delta 1e-3) between log L and log L_pred = LSE(a - alpha log N, b - beta log D, e), with
  A = e^a, B = e^b, E = e^e, is minimised by BFGS from the best points of a grid of
  initialisations; bootstrap confidence intervals refit on runs resampled with replacement.
* Compute optimum for C = 6 N D: N* = G (C/6)^(beta/(alpha+beta)), D* = C / (6 N*),
  G = (alpha A / (beta B))^(1/(alpha+beta)).
* Loss-to-loss: L2 = K (L1 - E1)^kappa + E2 (e.g. two validation sets or two tokenizers' bpb),
  fit the same robust way in log space with 0 <= E1 < min L1.

Command line, on a sweep file (a `get_config(arg)` plus a `sweep()` listing its args, e.g.
experiments/scaling_sweep.py):

    python -m gqlm.eval.scaling --sweep experiments/scaling_sweep.py --root DIR --print_commands
    python -m gqlm.eval.scaling --sweep experiments/scaling_sweep.py --root DIR --run   # sequentially
    python -m gqlm.eval.scaling --sweep experiments/scaling_sweep.py --root DIR --budgets 1e15,1e16

The last fits the finished runs' final validation losses (`DIR/NAME/metrics.jsonl`), prints the
fit with confidence intervals and compute-optimal (N, D) as JSON, and writes DIR/scaling.png.
N counts non-embedding parameters (active ones for MoE); D = steps x batch_size x seq_len tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import optimize

from gqlm.config import ConfigError, load_python_file

HUBER_DELTA = 1e-3


class FitError(ConfigError):
    """A fit that cannot be made from the data given (too few or invalid points, no finished runs)."""


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)), np.clip(r, -delta, delta)


def _lse_fit(z_PMK: np.ndarray, log_y_M: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber(LSE_k z - log y) over points M for P parameter vectors, and the softmax weights."""
    # Plain NumPy: scipy.special's logsumexp/softmax cost ~100x more on these tiny arrays.
    exp_PMK = np.exp(z_PMK - z_PMK.max(-1, keepdims=True))
    total_PM = exp_PMK.sum(-1)
    lse_PM = np.log(total_PM) + z_PMK.max(-1)
    loss_PM, dloss_PM = huber(lse_PM - log_y_M, delta)
    return loss_PM.sum(-1), dloss_PM[..., None] * exp_PMK / total_PM[..., None]


def _robust_minimize(objective: Callable, grid_PQ: np.ndarray, top: int) -> np.ndarray:
    """Runs BFGS from the `top` best grid points (objective evaluated in batch); the best result.
    (Unconstrained BFGS, not L-BFGS-B: scipy's L-BFGS-B core calls multithreaded BLAS per
    iteration, ~50x slower on a loaded machine; constraints are reparametrisations instead.)"""
    values_P = objective(grid_PQ, grad=False)
    best, best_value = None, np.inf
    for start in grid_PQ[np.argsort(values_P)[:top]]:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = optimize.minimize(lambda p: objective(p[None], grad=True), start, jac=True, method="BFGS",
                                    options={"maxiter": 5_000, "gtol": 1e-14})
        if res.fun < best_value:
            best, best_value = res.x, res.fun
    return best


def _check_points(name: str, num_params: int, *arrays: np.ndarray) -> list[np.ndarray]:
    arrays = [np.asarray(a, np.float64).ravel() for a in arrays]
    if len({len(a) for a in arrays}) != 1:
        raise FitError(f"{name}: inputs have different lengths {[len(a) for a in arrays]}")
    if len(arrays[0]) < num_params:
        raise FitError(f"{name} has {num_params} parameters but only {len(arrays[0])} points were given; "
                       f"it needs at least {num_params}")
    for a in arrays:
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise FitError(f"{name}: every value must be finite and positive, got {a.tolist()}")
    # Repeated inputs (duplicate runs, a bootstrap resample) add no information about the curve's shape.
    distinct = len(np.unique(np.stack(arrays[:-1], -1), axis=0))
    if distinct < num_params:
        raise FitError(f"{name} has {num_params} parameters but only {distinct} distinct inputs among the "
                       f"{len(arrays[0])} points; it needs at least {num_params}")
    return arrays


# ----------------------------------------------------------------------------- L(N, D)


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def predict(self, N, D) -> np.ndarray:
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N*, D*) minimising L under 6 N D = flops."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        N = G * np.power(np.asarray(flops, np.float64) / 6, b / (a + b))
        return N, np.asarray(flops, np.float64) / (6 * N)


def _scaling_objective(logN_M, logD_M, logL_M, delta):
    def objective(p_PQ: np.ndarray, grad: bool):
        a, alpha, b, beta, e = (p_PQ[:, i:i + 1] for i in range(5))
        z_PMK = np.stack([a - alpha * logN_M, b - beta * logD_M, np.broadcast_to(e, a.shape[:1] + logN_M.shape)], -1)
        loss_P, w_PMK = _lse_fit(z_PMK, logL_M, delta)
        if not grad:
            return loss_P
        w1, w2, w3 = w_PMK[0, :, 0], w_PMK[0, :, 1], w_PMK[0, :, 2]
        g = np.array([w1.sum(), -(w1 * logN_M).sum(), w2.sum(), -(w2 * logD_M).sum(), w3.sum()])
        return loss_P[0], g
    return objective


_SCALING_GRID = np.array(list(itertools.product(
    np.arange(0.0, 30.0, 5.0), np.arange(0.0, 2.01, 0.5), np.arange(0.0, 30.0, 5.0), np.arange(0.0, 2.01, 0.5),
    np.arange(-1.0, 1.51, 0.5))))


def fit_scaling_law(N, D, L, delta: float = HUBER_DELTA, top: int = 8) -> ScalingFit:
    """Robust fit of L(N, D) = E + A/N^alpha + B/D^beta (module doc)."""
    N, D, L = _check_points("fit_scaling_law (E, A, alpha, B, beta)", 5, N, D, L)
    for label, x in (("N (model sizes)", N), ("D (token counts)", D)):
        if len(np.unique(x)) < 3:  # each power law (scale and exponent) needs three distinct values
            raise FitError(f"fit_scaling_law needs at least 3 distinct {label}, got {np.unique(x).tolist()}")
    p = _robust_minimize(_scaling_objective(np.log(N), np.log(D), np.log(L), delta), _SCALING_GRID, top)
    return ScalingFit(E=float(np.exp(p[4])), A=float(np.exp(p[0])), alpha=float(p[1]), B=float(np.exp(p[2])),
                      beta=float(p[3]))


# ----------------------------------------------------------------------------- loss to loss


@dataclasses.dataclass(frozen=True)
class LossToLossFit:
    K: float
    kappa: float
    E1: float
    E2: float

    def predict(self, L1) -> np.ndarray:
        return self.K * np.power(np.asarray(L1, np.float64) - self.E1, self.kappa) + self.E2


def _l2l_objective(L1_M, logL2_M, delta):
    """Parameters (log K, kappa, u, log E2) with E1 = min(L1) sigmoid(u), so 0 < E1 < min L1."""
    m1 = L1_M.min()

    def objective(p_PQ: np.ndarray, grad: bool):
        k, kappa, u, e2 = (p_PQ[:, i:i + 1] for i in range(4))
        sig = 1 / (1 + np.exp(-u))
        E1 = m1 * sig
        log_gap_PM = np.log(L1_M - E1)
        z_PMK = np.stack([k + kappa * log_gap_PM, np.broadcast_to(e2, log_gap_PM.shape)], -1)
        loss_P, w_PMK = _lse_fit(z_PMK, logL2_M, delta)
        if not grad:
            return loss_P
        w1, w2 = w_PMK[0, :, 0], w_PMK[0, :, 1]
        dE1_du = m1 * sig[0, 0] * (1 - sig[0, 0])
        g = np.array([w1.sum(), (w1 * log_gap_PM[0]).sum(), -(w1 * kappa[0, 0] / (L1_M - E1[0, 0])).sum() * dE1_du,
                      w2.sum()])
        return loss_P[0], g
    return objective


def fit_loss_to_loss(L1, L2, delta: float = HUBER_DELTA, top: int = 8) -> LossToLossFit:
    """Robust fit of L2 = K (L1 - E1)^kappa + E2 (module doc)."""
    L1, L2 = _check_points("fit_loss_to_loss (K, kappa, E1, E2)", 4, L1, L2)
    fractions = np.array([1e-3, 0.25, 0.5, 0.75, 0.9, 0.97])
    grid = np.array(list(itertools.product(
        np.arange(-2.0, 2.01, 0.5), np.arange(0.25, 3.01, 0.25), np.log(fractions / (1 - fractions)),
        np.log(L2.min() * fractions))))
    p = _robust_minimize(_l2l_objective(L1, np.log(L2), delta), grid, top)
    return LossToLossFit(K=float(np.exp(p[0])), kappa=float(p[1]), E1=float(L1.min() / (1 + np.exp(-p[2]))),
                         E2=float(np.exp(p[3])))


# ----------------------------------------------------------------------------- bootstrap


def bootstrap(fit_fn: Callable, arrays: Sequence, num: int = 100, level: float = 0.95, seed: int = 0,
              ) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of every fitted parameter, refitting on points resampled
    with replacement (resamples with fewer distinct points than needed are skipped)."""
    arrays = [np.asarray(a, np.float64) for a in arrays]
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(num):
        idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
        try:
            fits.append(dataclasses.asdict(fit_fn(*(a[idx] for a in arrays))))
        except FitError:
            continue
    if not fits:
        raise FitError("bootstrap: no resample had enough distinct points to fit")
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: (float(np.percentile([f[k] for f in fits], lo)), float(np.percentile([f[k] for f in fits], hi)))
            for k in fits[0]}


# ----------------------------------------------------------------------------- runs and sweeps


class Run(NamedTuple):
    name: str
    arg: str  # the sweep file's get_config argument
    workdir: str
    N: float  # non-embedding (active) parameters
    D: float  # training tokens
    loss: float | None  # final validation loss; None while unfinished


def run_name(arg: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in arg)


def load_sweep(path: str) -> tuple[str, list[str]]:
    """(path, args) of a sweep file: a module with get_config(arg) and sweep() -> list of args."""
    module = load_python_file(path, "--sweep file")
    if not hasattr(module, "sweep"):
        raise ConfigError(f"--sweep={path!r} defines no sweep() listing its get_config arguments")
    return path, list(module.sweep())


def final_metric(workdir: str, step: int, split: str = "validation", key: str = "loss") -> float | None:
    """`key` of the `split` record at `step` in WORKDIR/metrics.jsonl (the last one, after resumes)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    value = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if record.get("step") == step and record.get("split") == split and key in record:
                value = float(record[key])
    return value


def sweep_runs(path: str, root: str, key: str = "loss") -> list[Run]:
    """Every run of a sweep, with its size, tokens and final validation `key` (None if unfinished)."""
    from gqlm.config import load_experiment
    from gqlm.models.flops import count_params
    from gqlm.tokenizers import load_tokenizer
    from gqlm.train.experiment import resolve_vocab
    path, args = load_sweep(path)
    runs, sizes = [], {}
    for arg in args:
        config = load_experiment(f"{path}:{arg}")
        config = resolve_vocab(config, load_tokenizer(config.data.tokenizer))
        if repr(config.model) not in sizes:  # token budgets share a model: count it once
            sizes[repr(config.model)] = float(count_params(config.model)["active_non_embedding"])
        workdir = os.path.join(root, run_name(arg))
        d, t = config.data, config.train
        runs.append(Run(run_name(arg), arg, workdir, sizes[repr(config.model)],
                        float(t.steps * d.batch_size * d.seq_len), final_metric(workdir, t.steps, key=key)))
    return runs


def finished(runs: Sequence[Run], root: str, need: int = 1) -> list[Run]:
    done = [r for r in runs if r.loss is not None]
    if len(done) < need:
        raise FitError(f"only {len(done)} of the sweep's {len(runs)} runs under {root!r} have finished "
                       f"(need {need}); run them first (--print_commands or --run)")
    return done


def train_command(path: str, run: Run) -> list[str]:
    return [sys.executable, "-m", "gqlm.train", "--config", f"{path}:{run.arg}", "--workdir", run.workdir]


def plot_scaling(fit: ScalingFit, runs: Sequence[Run], path: str) -> None:
    """Loss vs tokens, one colour per model size, with the fitted curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({r.N for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    all_D = np.array([r.D for r in runs])
    D = np.geomspace(all_D.min() / 1.5, all_D.max() * 1.5, 100)
    for N, color in zip(sizes, colors):
        pts = [r for r in runs if r.N == N]
        ax.scatter([r.D for r in pts], [r.loss for r in pts], color=color, label=f"N={N:.3g}")
        ax.plot(D, fit.predict(N, D), color=color, lw=1)
    ax.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="validation loss",
           title=f"E={fit.E:.3g}, alpha={fit.alpha:.3g}, beta={fit.beta:.3g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_to_loss(fit: LossToLossFit, L1, L2, path: str, labels: tuple[str, str] = ("L1", "L2")) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(L1, L2)
    x = np.linspace(max(fit.E1 + 1e-6, np.min(L1) * 0.95), np.max(L1) * 1.05, 100)
    ax.plot(x, fit.predict(x), lw=1)
    ax.set(xlabel=labels[0], ylabel=labels[1], title=f"K={fit.K:.3g}, kappa={fit.kappa:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Flags of the command (defined only when run, so importing this module defines none)."""
    from absl import flags
    flags.DEFINE_string("sweep", None, "Sweep file: get_config(arg) and sweep() -> list of args.")
    flags.DEFINE_string("root", None, "Directory holding one workdir per run (ROOT/NAME).")
    flags.DEFINE_bool("print_commands", False, "Print the train command of every unfinished run.")
    flags.DEFINE_bool("run", False, "Train the unfinished runs one after another.")
    flags.DEFINE_list("budgets", [], "Compute budgets C (FLOPs, C = 6 N D) to report compute-optimal N, D for.")
    flags.DEFINE_integer("bootstrap", 100, "Bootstrap resamples for the confidence intervals (0 disables).")
    flags.DEFINE_enum("metric", "loss", ["loss", "bpb"], "Validation metric to fit.")


def main(argv: list[str]) -> None:
    from absl import flags
    from gqlm import cli
    FLAGS = flags.FLAGS
    if not FLAGS.sweep or not FLAGS.root:
        cli.fail("--sweep and --root are required")
    runs = sweep_runs(FLAGS.sweep, FLAGS.root, FLAGS.metric)
    if FLAGS.print_commands or FLAGS.run:
        for run in (r for r in runs if r.loss is None):
            command = train_command(FLAGS.sweep, run)
            print(shlex.join(["python"] + command[1:]) if FLAGS.print_commands else f"running {run.name}", flush=True)
            if FLAGS.run and subprocess.run(command).returncode != 0:
                cli.fail(f"run {run.name!r} failed (workdir {run.workdir}); fix it and rerun --run to resume")
        return
    try:
        budgets = [float(b) for b in FLAGS.budgets]
    except ValueError:
        budgets = [float("nan")]
    if not all(np.isfinite(b) and b > 0 for b in budgets):
        cli.fail(f"--budgets={','.join(FLAGS.budgets)} must be positive numbers (FLOPs)")
    if FLAGS.bootstrap < 0:
        cli.fail(f"--bootstrap={FLAGS.bootstrap} must be >= 0")
    done = finished(runs, FLAGS.root)
    arrays = ([r.N for r in done], [r.D for r in done], [r.loss for r in done])
    fit = fit_scaling_law(*arrays)
    out = {"fit": dataclasses.asdict(fit), "runs": len(done), "of": len(runs)}
    if FLAGS.bootstrap:
        out["ci95"] = bootstrap(fit_scaling_law, arrays, FLAGS.bootstrap)
    out["compute_optimal"] = [{"flops": c, "N": float(n), "D": float(d), "loss": float(fit.predict(n, d))}
                              for c, (n, d) in zip(budgets, (fit.compute_optimal(c) for c in budgets))]
    plot_scaling(fit, done, os.path.join(FLAGS.root, "scaling.png"))
    print(json.dumps(out))


if __name__ == "__main__":
    define_flags()
    from gqlm import cli
    cli.run(main)
