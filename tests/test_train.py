"""The runner end to end on the real demo config (shrunk): sharding invariance, checkpoints, resume."""

import json
import os

import jax
import numpy as np
import pytest

from gqlm import config as config_lib
from gqlm import mesh as mesh_lib
from gqlm.data.pipeline import make_train_iterator, to_global
from gqlm.train import state as state_lib
from gqlm.train.checkpoint import restore_trained
from gqlm.train.experiment import build_experiment, jit_train_step
from gqlm.train.loop import train
from gqlm.train.tasks.lm import LMTask

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "tiny_cpu.py")


def smoke_config(**overrides):
    config = config_lib.load_experiment(EXPERIMENT + ":smoke")
    return config_lib.apply_overrides(config, dict(overrides))


def run_steps(config, num_steps):
    """Losses and final params of `num_steps` train steps on the config's mesh."""
    exp = build_experiment(config, LMTask())
    batches = make_train_iterator(exp.config, exp.tokenizer)
    sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    with jax.set_mesh(exp.mesh):
        state = state_lib.init_state(exp.config.model, exp.tx, exp.config.seed, exp.shardings)
        step = jit_train_step(exp, donate=False)
        losses = []
        for _ in range(num_steps):
            state, metrics = step(state, to_global(next(batches), sharding))
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


def assert_trees_close(a, b, rtol):
    """Per-tensor relative error ||x - y|| / ||y|| (Adam amplifies float noise in near-zero grads)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (np.linalg.norm(x - y), np.linalg.norm(y))


@pytest.mark.parametrize("mesh", [(2, 4, 1), (2, 2, 2)])
def test_same_losses_and_params_on_every_mesh(mesh):
    reference_losses, reference_params = run_steps(smoke_config(), 3)
    data, fsdp, tensor = mesh
    losses, params = run_steps(smoke_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}), 3)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert_trees_close(params, reference_params, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_soap_refreshes_on_sharded_meshes(mesh):
    """SOAP's eigh/QR switch with fsdp/tensor-sharded statistics (once a collective deadlock on
    XLA:CPU) runs through two refreshes and tracks the data-parallel run. Only losses, loosely:
    the first steps' statistics are nearly rank-deficient, and Adam in the eigenbasis turns
    float32 rounding (which differs between partitionings) in near-null directions into full-size
    updates; tests/test_soap.py checks the sharded transform exactly on well-conditioned inputs."""
    soap = {"optimizer.name": "soap", "optimizer.precondition_frequency": 2}
    reference_losses, _ = run_steps(smoke_config(**soap), 6)
    data, fsdp, tensor = mesh
    losses, _ = run_steps(smoke_config(**soap, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}), 6)
    assert losses[-1] < losses[0] - 0.2  # it trains
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-3)


def test_grad_accumulation_matches_one_big_batch():
    losses, params = run_steps(smoke_config(**{"train.grad_accum": 2}), 2)
    reference_losses, reference_params = run_steps(smoke_config(), 2)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert_trees_close(params, reference_params, rtol=1e-5)


def test_accumulate_gradients_gives_each_microbatch_its_rows_and_its_index():
    """Row r goes to microbatch r % 2; the index (which keys the router jitter) differs per microbatch."""
    from gqlm.train.step import accumulate_gradients
    rows = np.arange(6, dtype=np.float32)
    total = accumulate_gradients(lambda micro, i: micro["x"].sum() * 10.0 ** i, {"x": rows}, 2)
    assert float(total) == (0 + 2 + 4) + 10 * (1 + 3 + 5)


def test_params_are_sharded_not_replicated():
    exp = build_experiment(smoke_config(**{"mesh.data": 2, "mesh.fsdp": 4}), LMTask())
    with jax.set_mesh(exp.mesh):
        state = state_lib.init_state(exp.config.model, exp.tx, 0, exp.shardings)
    sharded = [x for x in jax.tree.leaves(state.params) if x.ndim == 2]
    assert sharded and all(len(x.addressable_shards) == 8 for x in sharded)
    # An fsdp-sharded matrix: each device holds a quarter of it.
    big = max(sharded, key=lambda x: x.size)
    assert big.addressable_shards[0].data.size * 4 == big.size


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_resume_is_bit_identical(tmp_path):
    config = smoke_config(**{"train.steps": 20, "train.log_every": 1, "train.checkpoint_every": 5,
                             "train.sample_tokens": 0})
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train(config, straight, LMTask())
    train(config, interrupted, LMTask(), stop_at=10)
    train(config, interrupted, LMTask())
    expected, resumed = read_losses(straight), read_losses(interrupted)
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]


def test_resuming_with_a_changed_config_says_what_changed(tmp_path, capsys):
    base = {"train.checkpoint_every": 2, "train.sample_tokens": 0}
    workdir = str(tmp_path / "run")
    train(smoke_config(**base, **{"train.steps": 2}), workdir, LMTask())
    capsys.readouterr()
    train(smoke_config(**base, **{"train.steps": 4}), workdir, LMTask())  # the same config, a longer schedule
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gqlm: warning:")]
    assert warnings == ["gqlm: warning: resuming step 2 with a config that differs from the checkpoint's: "
                        "train.steps: 2 -> 4"]
    train(smoke_config(**base, **{"train.steps": 6}), workdir, LMTask())  # from step 4, saved with steps=4
    assert "train.steps: 4 -> 6" in capsys.readouterr().out


def test_checkpoint_restores_on_another_mesh(tmp_path):
    workdir = str(tmp_path / "run")
    config = smoke_config(**{"train.steps": 4, "train.checkpoint_every": 2, "train.sample_tokens": 0})
    train(config, workdir, LMTask())
    _, step, state8 = restore_trained(workdir, LMTask())
    exp, step2, state_other = restore_trained(
        workdir, LMTask(), edit=lambda c: config_lib.apply_overrides(c, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    assert step == step2 == 4
    assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert_trees_close(jax.device_get(state_other.params), jax.device_get(state8.params), rtol=0)


def test_incompatible_checkpoint_names_the_parameter(tmp_path):
    workdir = str(tmp_path / "run")
    train(smoke_config(**{"train.steps": 2, "train.checkpoint_every": 2, "train.sample_tokens": 0}), workdir, LMTask())
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(config_lib.ConfigError, match="incompatible model.*mlp"):
        train(smoke_config(**{"train.steps": 4, "model.mlp_dim": 96}), workdir, LMTask())
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def unigram_entropy_bits_per_byte(texts):
    counts = np.bincount(np.frombuffer("".join(texts).encode("utf-8", "surrogateescape"), np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.slow
def test_demo_learns_below_unigram_entropy(tmp_path):
    from gqlm.data.corpora import load_documents
    config = config_lib.load_experiment(EXPERIMENT)
    config = config_lib.apply_override_strings(config, {"train.steps": "150", "train.eval_every": "150",
                                                 "train.sample_tokens": "0", "train.progress": "False"})
    metrics = train(config, str(tmp_path / "demo"), LMTask())
    entropy = unigram_entropy_bits_per_byte(load_documents(config.data, "validation"))
    assert 4.0 < entropy < 5.5
    assert metrics["bpb"] < entropy - 1.0, (metrics, entropy)
