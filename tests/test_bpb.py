"""Bits per byte end to end: summed target cross-entropy / (ln 2 x UTF-8 bytes of the targets).

The reference is NumPy: the model's logits (a plain forward pass) -> float64 log-softmax -> summed
cross-entropy over the masked targets / (ln 2 x the targets' bytes from the tokenizer's table).
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gqlm.data import corpora
from gqlm.data.pipeline import make_eval_batches, to_global
from gqlm.mesh import batch_sharding
from gqlm.train import state as state_lib
from gqlm.train.evaluation import evaluate
from gqlm.train.experiment import build_experiment, jit_eval_step, jit_train_step
from gqlm.train.loop import train
from gqlm.train.tasks.lm import LMTask
from tests.helpers import CPU8, ROOT, metric_rows, smoke_config


class UnevenBytes:
    """The byte tokenizer with a made-up byte table (0 to 4 bytes per id, specials 0), so the
    denominator is not simply the number of target tokens."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        rng = np.random.default_rng(7)
        self.table = rng.integers(0, 5, tokenizer.vocab_size).astype(np.int32)
        self.table[[tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]] = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def token_bytes(self):
        return self.table


def smoke_experiment(**overrides):
    exp = build_experiment(smoke_config(**overrides), LMTask())
    return exp._replace(tokenizer=UnevenBytes(exp.tokenizer))


def hand_built_batch(seed, B, T, target_ids):
    """Packed rows of 1-3 documents each, then padding; loss only where the target is in the
    input's document (as gqlm.data.packing builds them), with a few extra masked positions.
    Targets are drawn from `target_ids`."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(2, T - 2), size=rng.integers(0, 3), replace=False))
        end = T - rng.integers(0, 6)  # 0-5 padding positions at the end of the row
        bounds = [0, *[c for c in cuts if c < end], end]
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segment_ids[b, lo:hi], positions[b, lo:hi] = doc, np.arange(hi - lo)
    inputs = rng.integers(0, 256, (B, T)).astype(np.int32)
    targets = rng.choice(target_ids, (B, T)).astype(np.int32)
    last_of_doc = np.append(segment_ids[:, 1:] != segment_ids[:, :-1], np.ones((B, 1), bool), axis=1)
    loss_mask = ((segment_ids > 0) & ~last_of_doc & (rng.random((B, T)) > 0.1)).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "positions": positions, "segment_ids": segment_ids,
            "loss_mask": loss_mask}


def reference_sums(exp, params, batch):
    """(summed nats, target bytes, target tokens) of `batch` under `params`, in NumPy from the model's logits."""
    model = nnx.merge(exp.model.graphdef, jax.device_get(params))
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    num_bytes = exp.tokenizer.token_bytes()[batch["targets"]] * mask
    return float((nll * mask).sum()), float(num_bytes.sum()), float(mask.sum())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_step_and_evaluate_report_the_numpy_bits_per_byte(grad_accum):
    exp = smoke_experiment(**{"train.grad_accum": grad_accum})
    B, T, table = exp.config.data.batch_size, exp.config.data.seq_len, exp.tokenizer.token_bytes()
    # Batch 2 holds only long tokens: its bits per byte differ from batch 1's, so a mean of the
    # two batches' ratios would differ from the ratio of the sums.
    batches = [hand_built_batch(1, B, T, np.arange(len(table))), hand_built_batch(2, B, T, np.flatnonzero(table >= 3))]
    with jax.set_mesh(exp.mesh):
        state = state_lib.init_state(exp.config.model, exp.tx, exp.config.seed, exp.shardings)
        params = jax.device_get(state.params)
        sums = [reference_sums(exp, params, batch) for batch in batches]
        assert sums[0][1] != sums[0][2]  # bytes differ from token counts: the table matters
        _, metrics = jit_train_step(exp, donate=False)(state, to_global(batches[0], batch_sharding(
            exp.mesh, exp.config.mesh.rules)))
        got = evaluate(jit_eval_step(exp), state.params, batches, exp.mesh, exp.config.mesh.rules)

    nats, num_bytes, tokens = sums[0]
    assert float(metrics["bpb"]) == pytest.approx(nats / (math.log(2) * num_bytes), rel=1e-5)
    assert float(metrics["ce"]) == pytest.approx(nats / tokens, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(nats / tokens, rel=1e-5)  # dense: no aux loss
    assert float(metrics["tokens"]) == tokens
    # evaluate() sums nats and bytes over all batches before dividing (not a mean of ratios).
    nats, num_bytes, tokens = (sum(s[i] for s in sums) for i in range(3))
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * num_bytes), rel=1e-5)
    assert got["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert got["bytes_per_token"] == pytest.approx(num_bytes / tokens, rel=1e-6)


def test_eval_batches_count_every_utf8_byte_of_the_split_once(tmp_path):
    """The denominator on real data: over eval batches covering the validation split, the target
    bytes (byte tokenizer's table) are exactly the split's UTF-8 bytes; BOS/EOS count 0."""
    # Each document alone fills a row of 32 tokens: the file held out (by a hash of its path, so
    # of tmp_path) may be any of them.
    for i, text in enumerate(["héllo wörld, ünïcode ✓\n" * 3, "plain ascii\n" * 5, "日本語のテキスト\n" * 2,
                              "ναι\n" * 8, "emoji 🙂 line\n" * 4]):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    config = smoke_config(**{"data.corpus": "text_files", "data.glob": str(tmp_path / "*.txt"),
                             "data.data_dir": str(tmp_path / "tfds")})
    exp = build_experiment(config, LMTask())
    batches = make_eval_batches(exp.config, exp.tokenizer, "validation", num_batches=100)
    table = exp.tokenizer.token_bytes()
    counted = sum(float((table[b["targets"]] * b["loss_mask"]).sum()) for b in batches)
    docs = corpora.load_documents(exp.config.data, "validation")
    expected = sum(len(d.encode("utf-8", "surrogateescape")) for d in docs)
    assert len(docs) >= 1 and expected > 0 and counted == expected


def run_eval_cli(workdir, *args):
    return subprocess.run([sys.executable, "-m", "gqlm.eval", "--workdir", workdir, *args], cwd=ROOT,
                          env={**os.environ, **CPU8}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_eval_cli_reproduces_the_loops_final_validation_bpb(tmp_path):
    workdir = str(tmp_path / "run")
    final = train(smoke_config(**{"train.steps": 6}), workdir, LMTask())
    logged = [r for r in metric_rows(workdir) if r["split"] == "validation" and r["step"] == 6]
    assert len(logged) == 1 and logged[0]["bpb"] == final["bpb"]
    # The defaults evaluate what the loop did: its split and its train.eval_batches batches.
    result = run_eval_cli(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["step"] == 6 and got["split"] == "validation"
    assert got["bpb"] == logged[0]["bpb"] and got["loss"] == logged[0]["loss"]
    result = run_eval_cli(workdir, "--batches=-1")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "--batches=-1 must be >= 0 (0: the run's train.eval_batches)"), result.stderr[-3000:]
