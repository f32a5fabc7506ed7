"""GQ-VAE training: the loss falls, re-seeding runs, checkpoints round-trip, bad paths fail clearly."""

import json

import jax
import numpy as np
import pytest

from gqlm.config import ConfigError, base_config, load_experiment, validate_gqvae
from gqlm.tokenizers.gqvae.model import make_model, split_params
from gqlm.train.tasks.gqvae.checkpoint import CheckpointError, load_checkpoint
from gqlm.train.tasks.gqvae.step import is_codebook, make_optimizer
from gqlm.train.tasks.gqvae.train import train_gqvae

TEXTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles."] * 3


def tiny_config(**overrides):
    c = base_config()
    c.gqvae.update(dict(embed_dim=16, num_heads=2, encoder_layers=1, gater_layers=1, mlp_dim=32,
                        codebook_size=32, max_token_len=4, max_pretoken_len=8, batch_size=32,
                        learning_rate=3e-3, warmup_steps=10, reseed_every=10))
    c.gqvae.update(overrides)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gqvae_ckpt"))
    params, history = train_gqvae(tiny_config(), TEXTS, workdir, 50, log_every=5)
    return workdir, params, history


def test_loss_falls_over_50_steps(trained):
    _, _, history = trained
    assert [h["step"] for h in history] == list(range(5, 51, 5))
    # Against the end of warm-up (step 10): the loss there lacks the commitment term, yet is higher.
    assert history[-1]["loss"] < 0.8 * history[1]["loss"]
    assert history[-1]["recon"] < history[1]["recon"]
    for h in history:
        assert 0 < h["codebook_usage"] <= 1 and 1 <= h["codebook_perplexity"] <= 32
        assert 1 <= h["mean_token_len"] <= 4 and 0 <= h["byte_accuracy"] <= 1


def test_codebook_gets_its_own_learning_rate():
    cfg = tiny_config(codebook_lr_multiplier=10.0, learning_rate=1e-3).gqvae
    _, params = split_params(make_model(cfg))
    tx = make_optimizer(cfg, params)
    ones = jax.tree.map(np.ones_like, params)
    grads = jax.tree.map(lambda x: 1e-3 * x, ones)  # small: the global-norm clip stays inactive
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    for path, u in flat:
        expected = 1e-2 if is_codebook(path) else 1e-3  # Adam's first step moves each weight by lr
        np.testing.assert_allclose(np.abs(np.asarray(u)), expected, rtol=1e-3)


def test_checkpoint_holds_the_trained_model(trained):
    workdir, params, _ = trained
    cfg, restored = load_checkpoint(workdir)
    assert cfg.codebook_size == 32 and cfg.max_token_len == 4 and cfg.train_tokenizer
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params))


def test_bad_checkpoint_paths(tmp_path, trained):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="is not a GQ-VAE checkpoint"):
        load_checkpoint(str(tmp_path))
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is not a GQ-VAE checkpoint.*no complete"):
        load_checkpoint(str(empty))
    # The first driver's format (gqvae.json + params) is still read; its errors name the path.
    other = tmp_path / "other"
    other.mkdir()
    (other / "gqvae.json").write_text(json.dumps({"kind": "bpe"}))
    with pytest.raises(CheckpointError, match="is not a GQ-VAE checkpoint"):
        load_checkpoint(str(other))
    manifest = {"kind": "gqvae_checkpoint", "format_version": 1, "gqvae": tiny_config().gqvae.to_dict()}
    (other / "gqvae.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(str(other))
    (other / "gqvae.json").write_text(json.dumps(manifest))  # right manifest, no params
    with pytest.raises(CheckpointError, match=f"{other}.*unreadable params"):
        load_checkpoint(str(other))
    assert issubclass(CheckpointError, ConfigError)


def test_empty_texts_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no characters"):
        train_gqvae(tiny_config(), [""], str(tmp_path), 1)


@pytest.mark.slow
def test_experiment_smoke_variant_trains(tmp_path):
    validate_gqvae(load_experiment("experiments/gqvae_shakespeare.py").gqvae)
    assert load_experiment("experiments/gqvae_shakespeare.py:vqvae").gqvae.fixed_gate_every == 4
    assert load_experiment("experiments/gqvae_shakespeare.py:v8k").gqvae.codebook_size >= 2 * 8192
    both = load_experiment("experiments/gqvae_shakespeare.py:v8k,codebook=4096").gqvae
    assert (both.codebook_size, both.batch_size, both.reseed_every) == (4096, 256, 25)
    gate = load_experiment("experiments/gqvae_shakespeare.py:v8k,gate=1.5").gqvae
    assert (gate.gate_loss_weight, gate.codebook_size) == (1.5, 16384)
    robust = load_experiment("experiments/gqvae_shakespeare.py:v8k,robust").gqvae
    assert (robust.gate, robust.gate_target_len, robust.reseed_every) == ("bounded", 3.0, 25)
    cpu = load_experiment("experiments/gqvae_shakespeare.py:cpu")
    assert (cpu.gqvae.gate, cpu.gqvae.gate_target_len, cpu.gqvae.codebook_size, cpu.train.steps) == (
        "bounded", 3.5, 4096, 400)
    paper = load_experiment("experiments/gqvae_shakespeare.py:paper,codebook=16384")
    assert (paper.gqvae.warmup_steps, paper.gqvae.reseed_every, paper.gqvae.codebook_size) == (500, 250, 16384)
    assert paper.train.steps == 15_000
    with pytest.raises(ValueError, match="'nope'"):
        load_experiment("experiments/gqvae_shakespeare.py:v8k,nope")
    config = load_experiment("experiments/gqvae_shakespeare.py:smoke")
    _, history = train_gqvae(config, TEXTS, str(tmp_path), config.train.steps, log_every=10)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
