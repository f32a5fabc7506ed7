"""Scaling-law and loss-to-loss fits recover known parameters; compute optimum vs brute force;
bootstrap intervals; the sweep driver (commands, fits from metrics.jsonl); one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gqlm.eval import scaling as S

ROOT = os.path.join(os.path.dirname(__file__), "..")
SWEEP = os.path.join(ROOT, "experiments", "scaling_sweep.py")
TRUE = S.ScalingFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al.'s fit


def grid(true=TRUE):
    N, D = np.meshgrid(np.geomspace(1e6, 1e9, 5), np.geomspace(1e8, 1e11, 5))
    return N.ravel(), D.ravel(), true.predict(N.ravel(), D.ravel())


def rel_err(fit, true):
    return {k: abs(getattr(fit, k) / v - 1) for k, v in vars(true).items()}


def test_scaling_fit_recovers_known_parameters_within_2_percent():
    N, D, L = grid()
    assert max(rel_err(S.fit_scaling_law(N, D, L), TRUE).values()) < 0.02
    other = S.ScalingFit(E=0.8, A=40.0, alpha=0.5, B=900.0, beta=0.4)
    assert max(rel_err(S.fit_scaling_law(*grid(other)), other).values()) < 0.02


def test_huber_fit_shrugs_off_outliers_where_least_squares_does_not():
    N, D, L = grid()
    L = L.copy()
    L[[3, 17]] *= 1.3  # two diverged runs
    assert max(rel_err(S.fit_scaling_law(N, D, L), TRUE).values()) < 0.02
    assert max(rel_err(S.fit_scaling_law(N, D, L, delta=10.0), TRUE).values()) > 0.02  # plain L2


def test_compute_optimal_minimises_loss_on_the_budget_line():
    for C in (1e18, 1e21, 1e24):
        N_opt, D_opt = TRUE.compute_optimal(C)
        assert np.isclose(6 * N_opt * D_opt, C)
        N = np.geomspace(N_opt / 100, N_opt * 100, 200_001)  # brute force along 6 N D = C
        N_best = N[np.argmin(TRUE.predict(N, C / (6 * N)))]
        assert abs(N_best / N_opt - 1) < 1e-3


@pytest.mark.parametrize("true", [S.LossToLossFit(K=1.3, kappa=1.4, E1=0.8, E2=0.5),
                                  S.LossToLossFit(K=0.7, kappa=0.6, E1=0.2, E2=1.5)])
def test_loss_to_loss_fit_recovers_known_parameters_within_2_percent(true):
    L1 = np.linspace(1.0, 4.0, 12)
    assert max(rel_err(S.fit_loss_to_loss(L1, true.predict(L1)), true).values()) < 0.02


def test_bootstrap_intervals_bracket_the_truth_on_noisy_data():
    N, D, L = grid()
    L = L * np.exp(np.random.default_rng(0).normal(0, 0.003, L.shape))
    fit = S.fit_scaling_law(N, D, L)
    ci = S.bootstrap(S.fit_scaling_law, (N, D, L), num=8)
    for k in ("E", "alpha", "beta"):
        lo, hi = ci[k]
        assert lo <= getattr(fit, k) <= hi and lo < hi
        assert lo * 0.97 <= getattr(TRUE, k) <= hi * 1.03


def test_too_few_points_is_a_one_line_error():
    N, D, L = grid()
    with pytest.raises(S.FitError, match="5 parameters but only 4 points"):
        S.fit_scaling_law(N[:4], D[:4], L[:4])
    with pytest.raises(S.FitError, match="4 parameters but only 3 points"):
        S.fit_loss_to_loss([1.0, 2.0, 3.0], [1.0, 1.5, 2.0])
    with pytest.raises(S.FitError, match="finite and positive"):
        S.fit_scaling_law(N, D, np.where(np.arange(25) == 2, np.nan, L))


# ----------------------------------------------------------------------------- the sweep driver


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "gqlm.eval.scaling", "--sweep", SWEEP, *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_sweep_commands_and_fit_from_metrics_files(tmp_path):
    runs = S.sweep_runs(SWEEP, str(tmp_path))
    assert len(runs) == 16 and len({r.N for r in runs}) == 4 and len({r.D for r in runs}) == 4
    with pytest.raises(S.FitError, match="only 0 of the sweep's 16 runs"):
        S.finished(runs, str(tmp_path))
    out = cli("--root", str(tmp_path), "--print_commands")
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 16
    assert lines[0] == (f"python -m gqlm.train --config {SWEEP}:w32,262144 --workdir {tmp_path}/w32_262144")
    failed = cli("--root", str(tmp_path))
    assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0 and "0 of the sweep" in failed.stderr

    # Finished runs: a validation record at the last step, as the runner writes it (after a train record).
    true = S.ScalingFit(E=1.1, A=30.0, alpha=0.35, B=200.0, beta=0.3)
    for r in runs[1:]:  # one run left unfinished
        steps = int(r.D // (16 * 128))
        os.makedirs(r.workdir)
        with open(os.path.join(r.workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": steps, "split": "train", "loss": 9.0}) + "\n")
            f.write(json.dumps({"step": steps, "split": "validation", "loss": float(true.predict(r.N, r.D))}) + "\n")
    out = cli("--root", str(tmp_path), "--bootstrap", "0", "--budgets", "1e15")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["runs"] == 15 and result["of"] == 16
    assert max(rel_err(S.ScalingFit(**result["fit"]), true).values()) < 0.02
    N_opt, D_opt = true.compute_optimal(1e15)
    assert abs(result["compute_optimal"][0]["N"] / N_opt - 1) < 0.05
    assert os.path.getsize(tmp_path / "scaling.png") > 0
    assert len(cli("--root", str(tmp_path), "--print_commands").stdout.strip().splitlines()) == 1


def test_fits_refuse_repeated_or_single_size_inputs():
    """Five points of two distinct (N, D), or every run at one model size, cannot identify the law:
    the fit must refuse them rather than return arbitrary exponents (as it did before)."""
    N, D, L = grid()
    idx = [0, 0, 0, 6, 6]
    with pytest.raises(S.FitError, match="only 2 distinct inputs"):
        S.fit_scaling_law(N[idx], D[idx], L[idx])
    one_size = N == N[0]  # five token counts of a single model size
    with pytest.raises(S.FitError, match="3 distinct N"):
        S.fit_scaling_law(N[one_size], D[one_size], L[one_size])
    with pytest.raises(S.FitError, match="only 3 distinct inputs"):
        S.fit_loss_to_loss([2.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.5, 2.0])
    # Duplicated runs on a sound design still recover the truth.
    dup = np.r_[np.arange(25), np.arange(25)]
    assert max(rel_err(S.fit_scaling_law(N[dup], D[dup], L[dup]), TRUE).values()) < 0.02


def test_bootstrap_skips_resamples_with_too_few_distinct_points():
    """With 5 distinct points, a resample is fit only when all 5 appear; others are skipped, so
    every kept refit sees the exact power law and recovers it."""
    N, D, L = grid()
    pick = [0, 6, 12, 18, 24]  # the diagonal: 5 distinct N and D
    ci = S.bootstrap(S.fit_scaling_law, (N[pick], D[pick], L[pick]), num=60)
    fit = S.fit_scaling_law(N[pick], D[pick], L[pick])
    for k in ("E", "alpha", "beta"):
        assert ci[k] == pytest.approx((getattr(fit, k),) * 2, rel=1e-3)


def test_cli_refuses_bad_budgets(tmp_path):
    for bad in ("-1e15", "nan", "x"):
        out = cli("--root", str(tmp_path), "--budgets", bad)
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--budgets" in out.stderr
    out = cli("--root", str(tmp_path), "--metric", "perplexity")  # a typo once fitted "0 of N finished runs"
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--metric=perplexity" in out.stderr
