"""GQ-VAE gate collapse: the cut metrics against a NumPy loop, the detector on constructed gate
sequences (both collapse directions and a healthy one), the monitor's warnings, the gate variants'
gradients against closed forms (the fixed gates' never vanishes where the paper's does)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqlm.config import ConfigError, base_config, validate_gqvae
from gqlm.tokenizers.gqvae.gate import gate_probs
from gqlm.tokenizers.gqvae.model import finalize_gates, hard_boundaries
from gqlm.train.tasks.gqvae.collapse import (OK, TO_BYTES, TO_PRETOKENS, CollapseMonitor, collapse_state)
from gqlm.train.tasks.gqvae.loss import cut_metrics
from gqlm.train.tasks.gqvae.train import train_gqvae
from tests.test_gqvae_train import TEXTS, tiny_config

M = 10  # max token length, as in the experiments


def pieces(seed, b=64, t=16):
    lengths = np.random.default_rng(seed).integers(1, t + 1, b).astype(np.int32)
    return lengths, t


def metrics_of(logits, lengths):
    """(cut metrics, mean token length) of gate logits [B, T] through the model's own gate path."""
    logits, lengths = jnp.asarray(logits, jnp.float32), jnp.asarray(lengths)
    g = finalize_gates(gate_probs(logits), lengths)
    ends = hard_boundaries(g, lengths, M)
    m = {k: float(v) for k, v in cut_metrics(ends, g, logits, lengths).items()}
    return m, float(np.sum(np.asarray(lengths)) / np.sum(np.asarray(ends)))


def numpy_cut_metrics(logits, lengths):
    """Direct loops: which ends the gate made, which 3-10-byte pieces it cut inside."""
    gate_ends = forced_ends = cut_pieces = mid_pieces = saturated = inner = 0
    for row, n in zip(logits, lengths):
        run, cut = 0, False
        for t in range(n):
            run += 1
            if t < n - 1:
                inner += 1
                saturated += abs(row[t]) > 9.0
            if t < n - 1 and row[t] > 0:
                gate_ends, cut, run = gate_ends + 1, True, 0
            elif t == n - 1 or run == M:
                forced_ends, run = forced_ends + 1, 0
        mid_pieces += 3 <= n <= 10
        cut_pieces += cut and 3 <= n <= 10
    return dict(forced_cut_share=forced_ends / (gate_ends + forced_ends),
                pretoken_cut_share=cut_pieces / mid_pieces, saturated_gates=saturated / inner)


def test_cut_metrics_match_direct_loop():
    lengths, t = pieces(0)
    logits = np.random.default_rng(1).normal(0, 8, (len(lengths), t)) - 4  # some cuts, some saturated
    got, _ = metrics_of(logits, lengths)
    for key, value in numpy_cut_metrics(logits, lengths).items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def constructed(kind, lengths, t):
    """Gate logits of a collapse to pretokens (-20 everywhere: only forced ends), to bytes (+20),
    or of a healthy gate (a cut every 3 bytes)."""
    b = len(lengths)
    if kind == "pretokens":
        return np.full((b, t), -20.0)
    if kind == "bytes":
        return np.full((b, t), 20.0)
    return np.where((np.arange(t)[None, :] + 1) % 3 == 0, 3.0, -3.0) * np.ones((b, 1))


@pytest.mark.parametrize("kind,verdict", [("pretokens", TO_PRETOKENS), ("bytes", TO_BYTES), ("healthy", OK)])
def test_detector_on_constructed_gates(kind, verdict):
    windows = []
    for seed in range(3):  # three logged steps, three batches
        lengths, t = pieces(seed)
        m, token_len = metrics_of(constructed(kind, lengths, t), lengths)
        windows.append((m["pretoken_cut_share"], token_len, m["forced_cut_share"]))
    cut_W, len_W, forced_W = map(np.array, zip(*windows))
    assert collapse_state(cut_W, len_W) == verdict
    if kind == "pretokens":  # no end where the gate alone decides
        np.testing.assert_array_equal(cut_W, 0.0)
        np.testing.assert_array_equal(forced_W, 1.0)
    if kind == "bytes":
        np.testing.assert_array_equal(len_W, 1.0)
    if kind == "healthy":  # every piece of >= 4 bytes is cut inside, tokens are ~3 bytes
        assert (cut_W > 0.8).all() and (len_W > 2).all()


def test_detector_needs_the_whole_window():
    assert collapse_state([0.0, 0.3, 0.0], [3.0, 3.0, 3.0]) == OK  # one log cut pieces: not collapsed
    assert collapse_state([0.9, 0.9], [1.2, 1.6]) == OK
    assert collapse_state([0.04], [4.0]) == TO_PRETOKENS
    with pytest.raises(ValueError, match="equally long"):
        collapse_state([0.1, 0.2], [3.0])


def test_monitor_warns_once_per_transition():
    monitor = CollapseMonitor(window=3, min_step=20)
    healthy = dict(pretoken_cut_share=0.7, mean_token_len=2.9, mean_gate=0.35)
    collapsed = dict(pretoken_cut_share=0.0, mean_token_len=4.1, mean_gate=0.26)
    assert monitor.update(10, collapsed) is None  # before min_step: ignored
    said = [monitor.update(step, collapsed) for step in (20, 30, 40, 50)]
    assert said[:2] == [None, None] and said[3] is None  # the window fills, then one warning
    assert "collapsing to pretokens" in said[2] and "mean gate 0.260" in said[2]
    said = [monitor.update(step, healthy) for step in (60, 70, 80)]
    assert said[0] is not None and "recovered" in said[0] and said[1:] == [None, None]
    assert monitor.update(90, dict(collapsed, mean_token_len=1.1)) is None  # one log is not a window


def sigmoid_slope(x):
    s = 1 / (1 + np.exp(-x))
    return s * (1 - s)


@pytest.mark.parametrize("kind", ["paper", "bounded", "straight_through"])
def test_gate_gradient_at_a_saturated_logit(kind):
    """The gater's last bias b sets every logit l = b (conv weights 0): dg/db = dg/dl. At l = -20
    the paper's gate has sigmoid'(-20) ~ 2e-9 (below Adam's epsilon); the fixed gates give
    sigmoid'(c) = 0.0177 (c = 4) to a loss that wants cuts, and nothing to one pushing further out."""
    n, bound = 32, 4.0

    def total_gate(bias, sign):
        return sign * jnp.sum(gate_probs(jnp.full((n,), bias), kind, bound))

    for logit in (-20.0, 20.0):
        back = 1.0 if logit < 0 else -1.0  # the direction that brings the logit back towards 0
        grad_in = float(jax.grad(total_gate)(logit, -back))  # a loss that wants the logit back
        grad_out = float(jax.grad(total_gate)(logit, back))  # one that pushes it further out
        if kind == "paper":  # float32: sigmoid(20) rounds to 1, so its slope is 0, not even 2e-9
            assert abs(grad_in) <= n * sigmoid_slope(20.0) * (1 + 1e-3) and abs(grad_in) < 1e-8 * n
        else:
            assert grad_in == pytest.approx(-back * n * sigmoid_slope(bound), rel=1e-5)
            assert abs(grad_in) >= 0.017 * n  # the documented floor: sigmoid'(4) per position
            assert grad_out == 0.0


def test_bounded_gate_is_the_papers_inside_the_box():
    logits = jnp.linspace(-3.9, 3.9, 41)
    np.testing.assert_array_equal(gate_probs(logits, "bounded", 4.0), gate_probs(logits, "paper"))
    grad = lambda kind: jax.grad(lambda x: jnp.sum(jnp.sin(3 * gate_probs(x, kind, 4.0))))(logits)  # noqa: E731
    np.testing.assert_allclose(grad("bounded"), grad("paper"), rtol=1e-6)
    cuts = np.asarray(logits) > 1e-6  # the middle one is ~1e-8: sigmoid rounds it to 0.5, no cut
    hard = np.asarray(gate_probs(logits, "straight_through", 4.0))
    np.testing.assert_array_equal(hard, cuts.astype(np.float32))
    for kind in ("paper", "bounded", "straight_through"):  # all cut where the tokenizer does
        np.testing.assert_array_equal(np.asarray(gate_probs(logits, kind, 4.0)) > 0.5, cuts)


def test_gate_config_is_checked():
    with pytest.raises(ConfigError, match="gqvae.gate='sigmoid'"):
        validate_gqvae(tiny_config(gate="sigmoid").gqvae)
    with pytest.raises(ConfigError, match="gqvae.gate_bound=0"):
        validate_gqvae(tiny_config(gate="bounded", gate_bound=0.0).gqvae)


@pytest.mark.slow
def test_training_warns_when_the_gate_collapses(tmp_path, capsys):
    """A compression weight of 30 drives a tiny model's gate shut within a few steps: the train
    metrics say so and the run prints the monitor's warning."""
    config = tiny_config(gate_loss_weight=30.0, warmup_steps=40)
    _, history = train_gqvae(config, TEXTS, str(tmp_path), 40, log_every=5)
    for key in ("mean_gate", "forced_cut_share", "pretoken_cut_share", "saturated_gates", "codes_in_use",
                "mean_token_len", "gate_weight"):
        assert key in history[-1], key
    assert history[-1]["pretoken_cut_share"] < 0.05 and history[-1]["forced_cut_share"] == 1.0
    assert "WARNING: GQ-VAE gate collapsing to pretokens" in capsys.readouterr().out


def test_target_rate_term_and_ramp_match_closed_forms():
    from tests.test_gqvae_model import random_batch, tiny_cfg
    from gqlm.tokenizers.gqvae.model import make_model
    from gqlm.train.tasks.gqvae.loss import gqvae_loss
    from gqlm.train.tasks.gqvae.step import gate_weight_at

    model, batch = make_model(tiny_cfg(gate="bounded")), random_batch(3)
    plain, m = gqvae_loss(model, batch, True, tiny_cfg(gate="bounded"))
    held, _ = gqvae_loss(model, batch, True, tiny_cfg(gate="bounded", gate_target_len=3.0, gate_target_weight=50.0))
    assert float(held) == pytest.approx(float(plain) + 50.0 * (float(m["gate_loss"]) - 1 / 3) ** 2, rel=1e-6)
    cfg = tiny_cfg(gate_loss_weight=3.0, warmup_steps=10, gate_weight_ramp_steps=4)
    got = [float(gate_weight_at(cfg, jnp.asarray(step))) for step in (0, 9, 10, 11, 13, 40)]
    assert got == pytest.approx([0.0, 0.0, 0.75, 1.5, 3.0, 3.0])  # 0 in warm-up, then linear
    assert gate_weight_at(tiny_cfg(gate_loss_weight=3.0), jnp.asarray(5)) == 3.0  # no ramp: the constant
