"""The GQ-VAE through the runner (gqlm.train): it trains, logs its metrics, resumes exactly from its
checkpoint (across a dead-code re-seeding), and the tokenizer builds from that checkpoint. Also the
re-seeding hook and its buffer of recent encoder outputs, one by one, and bad inputs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqlm import config as config_lib
from gqlm import mesh as mesh_lib
from gqlm.config import ConfigError
from gqlm.data.pipeline import to_global
from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
from gqlm.train.experiment import build_experiment
from gqlm.train.loop import train
from gqlm.train.tasks.gqvae.checkpoint import CheckpointError, load_checkpoint
from gqlm.train.tasks.gqvae.step import GQVAEState, remember, reseed_dead_codes
from gqlm.train.tasks.gqvae.task import GQVAETask, codebook_stats
from gqlm.train.tasks.lm import LMTask

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXPERIMENT = os.path.join(ROOT, "experiments", "gqvae_shakespeare.py")
TEXTS = ["Now is the winter of our discontent made glorious summer by this sun of York; "
         "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
         "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."]
STEPS = 6


def smoke_config(**overrides):
    """The experiment's smoke variant: re-seeding after updates 4 (warm-up 2, every 2; not at the last)."""
    base = {"train.steps": STEPS, "train.checkpoint_every": 3, "train.eval_every": 3, "train.log_every": 1,
            "gqvae.warmup_steps": 2, "gqvae.reseed_every": 2}
    config = config_lib.load_experiment(EXPERIMENT + ":smoke")
    return config_lib.apply_overrides(config, {**base, **overrides})


def task():
    return GQVAETask({"train": TEXTS, "validation": TEXTS[1:]})


def rows(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps straight, and as 3 steps + a resumed run."""
    straight = str(tmp_path_factory.mktemp("straight"))
    final = train(smoke_config(), straight, task=task())
    resumed = str(tmp_path_factory.mktemp("resumed"))
    train(smoke_config(), resumed, stop_at=3, task=task())
    train(smoke_config(), resumed, task=task())
    return straight, resumed, final


def test_runner_logs_the_gqvae_metrics(runs):
    straight, _, final = runs
    train_rows = rows(straight, "train")
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for key in ("loss", "recon", "byte_accuracy", "mean_gate", "mean_token_len", "codebook_usage",
                "codebook_perplexity", "codes_in_use", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    # The re-seeding hook ran after update 4 only (warm-up 2, every 2, never after the last).
    assert [r["reseeded"] for r in train_rows] == [0, 0, 0, 1, 0, 0]
    # codes_in_use counts codes since the last re-seeding: after update 1 and right after the
    # re-seeding (update 5) it is this batch's own count (codebook_usage x 64 codes), then it grows.
    in_use = [r["codes_in_use"] for r in train_rows]
    for i in (0, 4):
        assert in_use[i] == round(train_rows[i]["codebook_usage"] * 64)
    assert in_use[0] <= in_use[1] <= in_use[2] <= in_use[3] and in_use[4] <= in_use[5]
    assert [r["step"] for r in rows(straight, "validation")] == [3, 6]
    assert final["byte_accuracy"] == rows(straight, "validation")[-1]["byte_accuracy"]
    assert os.listdir(os.path.join(straight, "tensorboard"))


def test_resume_is_exact_across_a_reseeding(runs):
    straight, resumed, _ = runs
    _, a = load_checkpoint(straight)
    _, b = load_checkpoint(resumed)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    losses = lambda w: [r["loss"] for r in rows(w, "train")]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_tokenizer_builds_from_the_runner_checkpoint(runs):
    straight, _, _ = runs
    cfg, params = load_checkpoint(straight)
    assert cfg.codebook_size == 64 and cfg.train_tokenizer
    tok = GQVAETokenizer.build(*load_checkpoint(straight), 259, TEXTS)  # bytes + specials only: always buildable
    for text in TEXTS + ["unseen wörds ☃ \x00"]:
        assert tok.decode(tok.encode(text)) == text
    # The tokenizer segments with the checkpoint's parameters.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tok.params), params)


def test_codebook_stats_match_a_direct_count():
    counts = np.array([3.0, 0.0, 1.0, 0.0])
    stats = codebook_stats(counts)
    p = np.array([0.75, 0.25])
    assert stats["codes_in_use"] == 2 and stats["codebook_usage"] == 0.5
    np.testing.assert_allclose(stats["codebook_perplexity"], np.exp(-(p * np.log(p)).sum()))


def tiny_state(counts, recent, recent_valid, step=0):
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(len(counts), recent.shape[1])).astype(np.float32)
    params = {"quantizer": {"codebook": jnp.asarray(codebook)}, "other": {"w": jnp.ones((2,))}}
    return GQVAEState(jnp.int32(step), params, (), jax.random.PRNGKey(0), jnp.asarray(counts, jnp.float32),
                      jnp.asarray(recent), jnp.asarray(recent_valid))


def test_reseed_hook_replaces_exactly_the_dead_codes_with_distinct_recent_outputs():
    counts = np.array([2, 0, 5, 0, 0, 1, 0, 0], np.float32)
    recent = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) + 100
    valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)  # two rows are unwritten padding
    state = tiny_state(counts, recent, valid)
    new = reseed_dead_codes(state, jax.random.PRNGKey(1))
    old_cb, new_cb = np.asarray(state.params["quantizer"]["codebook"]), np.asarray(new.params["quantizer"]["codebook"])
    used = counts > 0
    np.testing.assert_array_equal(new_cb[used], old_cb[used])
    picked = [tuple(r) for r in new_cb[~used]]
    valid_rows = {tuple(r) for r in recent[valid]}
    assert all(r in valid_rows for r in picked) and len(set(picked)) == len(picked)
    assert np.all(np.asarray(new.code_counts) == 0)
    np.testing.assert_array_equal(new.params["other"]["w"], state.params["other"]["w"])


def test_remember_writes_valid_outputs_into_the_steps_slots():
    n, d, rows_per_step = 8, 2, 3
    state = tiny_state(np.ones(n), np.zeros((n, d), np.float32), np.zeros(n, bool), step=3)
    z_BTD = jnp.asarray(np.arange(2 * 4 * d, dtype=np.float32).reshape(2, 4, d) + 1)
    valid_BT = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], bool)  # exactly 3 valid positions
    recent, recent_valid = map(np.asarray, remember(state, z_BTD, valid_BT, jax.random.PRNGKey(2), rows_per_step))
    slots = [(3 * rows_per_step + i) % n for i in range(rows_per_step)]  # 9, 10, 11 -> 1, 2, 3
    written = {tuple(recent[s]) for s in slots}
    expected = {tuple(np.asarray(z_BTD)[b, t]) for b, t in [(0, 0), (0, 1), (1, 0)]}
    assert written == expected and recent_valid[slots].all()
    untouched = [i for i in range(n) if i not in slots]
    assert not recent[untouched].any() and not recent_valid[untouched].any()
    # Fewer valid positions than rows: the extra picks are marked invalid, never used for re-seeding.
    one_valid = jnp.asarray([[1, 0, 0, 0], [0, 0, 0, 0]], bool)
    _, recent_valid = remember(state, z_BTD, one_valid, jax.random.PRNGKey(2), rows_per_step)
    assert int(np.asarray(recent_valid).sum()) == 1


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="gqvae.batch_size=12"):
        build_experiment(smoke_config(**{"gqvae.batch_size": 12}), task())  # 8 data-parallel devices
    with pytest.raises(ConfigError, match="train.grad_accum=2"):
        build_experiment(smoke_config(**{"train.grad_accum": 2}), task())
    with pytest.raises(ConfigError, match="no characters"):
        train(smoke_config(), str(tmp_path / "w"), task=GQVAETask({"train": [""], "validation": [""]}))


@pytest.mark.slow
def test_same_losses_when_the_parameters_are_sharded_too():
    """Batch over 8 data shards vs 2 data x 4 fsdp (parameters sharded): the same losses."""
    def losses(**mesh):
        gqvae = task()
        exp = build_experiment(smoke_config(**mesh), gqvae)
        batches = gqvae.train_iterator(exp)
        sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
        with jax.set_mesh(exp.mesh):
            state, step, out = gqvae.init_state(exp), gqvae.train_step(exp), []
            for _ in range(4):  # across the end of warm-up (2): quantized steps too
                state, metrics = step(state, to_global(next(batches), sharding))
                out.append(float(metrics["loss"]))
        return out
    np.testing.assert_allclose(losses(), losses(**{"mesh.data": 2, "mesh.fsdp": 4}), rtol=1e-4)


@pytest.mark.slow
def test_cli_trains_resumes_and_tokenize_reads_the_workdir(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20))
    data = ["--config.data.corpus=text_files", f"--config.data.glob={corpus}",
            f"--config.data.data_dir={tmp_path / 'tfds'}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    workdir = str(tmp_path / "gq")
    train_args = ["gqlm.train", f"--config={EXPERIMENT}:smoke", f"--workdir={workdir}", *data]
    r = run(*train_args, "--stop_at_step=10")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(*train_args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 10" in r.stdout and "codes in use" in r.stdout
    out = str(tmp_path / "tok")
    r = run("gqlm.tokenize", "--kind=gqvae", f"--checkpoint={workdir}", "--vocab_size=259", f"--out={out}",
            "--corpus=text_files", f"--glob={corpus}", f"--data_dir={tmp_path / 'tfds'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vocab_size=259" in r.stdout


@pytest.mark.slow
def test_an_lm_workdir_is_not_a_gqvae_checkpoint(tmp_path):
    config = config_lib.load_experiment(os.path.join(ROOT, "experiments", "tiny_cpu.py") + ":smoke")
    config = config_lib.apply_override_strings(config, {"train.steps": "1", "train.sample_tokens": "0"})
    train(config, str(tmp_path), LMTask())
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*LM workdir"):
        load_checkpoint(str(tmp_path))
