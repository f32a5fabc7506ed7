"""Training data from prepared corpora: windows equal the reference token stream, per-process rows
make up the same global batches, resume is exact, mixtures hold their weights, bad sources are
refused, and a two-source run reports bits per byte per source."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gqlm import config as config_lib
from gqlm.config import ConfigError
from gqlm.data import packing, pipeline, prepared
from gqlm.data.prepare import Spec, prepare
from gqlm.tokenizers.byte import ByteTokenizer
from gqlm.tokenizers.base import text_to_bytes

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOK = ByteTokenizer()
RNG = np.random.default_rng(1)


def make_source(root, name, num_docs, max_len, shard_bytes=4_000):
    """A prepared byte-level source; returns (directory, reference train stream (tokens, doc ids))."""
    lines = ["".join(RNG.choice(list("abcdefgh é"), int(RNG.integers(0, max_len)))) for _ in range(num_docs)]
    (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    out = root / name
    prepare(Spec((str(root / f"{name}.jsonl"),), "byte", validation_fraction=0.2, shard_bytes=shard_bytes), str(out))
    from gqlm.data.prepare import is_validation
    train = [list(text_to_bytes(t)) for t in lines if not is_validation(t, 0.2)]
    return str(out), packing.concat_documents(train, TOK.bos_id, TOK.eos_id)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return make_source(root, "alpha", 400, 120), make_source(root, "beta", 300, 40)


def data_config(sources_text, **data):
    config = config_lib.base_config()
    config.data.update({"corpus": "prepared", "sources": sources_text, "seq_len": 32, "batch_size": 16, **data})
    config.lock()
    return config


def test_windows_equal_the_reference_stream(sources):
    (directory, (tokens, doc_ids)), _ = sources
    split = prepared.PreparedSplit(directory, "train", prepared.read_meta(directory, TOK))
    assert split.length == len(tokens)
    assert len(split.paths) > 3  # windows cross shard boundaries
    for start in list(RNG.integers(0, len(tokens), 200)) + [0, len(tokens) - 5]:
        got_tokens, got_docs = split.window(int(start), 33)
        np.testing.assert_array_equal(got_tokens, tokens[start:start + 33])
        # documents are told apart the same way (ids may differ, boundaries may not)
        want = doc_ids[start:start + 33]
        np.testing.assert_array_equal(got_docs[1:] != got_docs[:-1], want[1:] != want[:-1])


def test_rows_pack_like_the_in_memory_stream(sources):
    (directory, (tokens, doc_ids)), _ = sources
    split = prepared.PreparedSplit(directory, "train", prepared.read_meta(directory, TOK))
    rows = np.array([0, 3, split.rows(32) - 1, -1, 7])
    got = prepared.pack_window_rows(split, rows, 32, TOK.pad_id)
    want = packing.pack_rows(tokens, doc_ids, rows, 32, TOK.pad_id)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_processes_read_disjoint_rows_of_the_same_global_batches_and_resume_exactly(sources):
    (a, _), (b, _) = sources
    config = data_config(f"{a}=0.6,{b}=0.4")
    whole = take(pipeline.make_train_iterator(config, TOK, 0, 1), 4)
    parts = [take(pipeline.make_train_iterator(config, TOK, p, 2), 4) for p in range(2)]
    for i, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([parts[0][i][key], parts[1][i][key]]), batch[key])
    it = pipeline.make_train_iterator(config, TOK, 0, 1)
    take(it, 2)
    state = it.get_state()
    resumed = pipeline.make_train_iterator(config, TOK, 0, 1)
    resumed.set_state(state)
    for got, want in zip(take(resumed, 2), whole[2:]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_mixture_token_shares_hold_their_weights(sources):
    (a, _), (b, _) = sources
    config = data_config(f"{a}=0.7,{b}=0.3")
    splits, weights = pipeline.open_split(config, TOK, "train")
    batches = prepared.row_batches(splits, weights, config)
    source_B = np.concatenate([np.asarray(batches[i][0]) for i in range(1000)])
    assert abs(np.mean(source_B == 0) - 0.7) < 0.01
    assert abs(np.mean(source_B == 1) - 0.3) < 0.01


def test_a_stream_shorter_than_train_steps_is_refused_up_front(sources):
    # It ended in a bare StopIteration traceback at that step of training (gqlm.train, checked by hand).
    (a, (tokens, _)), (b, _) = sources
    batches = (len(tokens) - 1) // 32 // 16  # one epoch of alpha's full rows, in whole batches of 16
    config = data_config(a, num_epochs=1)
    config.unlock()
    config.train.steps = batches + 1
    with pytest.raises(ConfigError, match=f"ends after {batches} batches .* before train.steps={batches + 1}"):
        pipeline.make_train_iterator(config, TOK, 0, 1)
    config.train.steps = batches
    it = pipeline.make_train_iterator(config, TOK, 0, 1)
    assert len(take(it, batches)) == batches
    with pytest.raises(StopIteration):
        next(it)
    config.data.sources, config.train.steps = f"{a}=0.5,{b}=0.5", 1000  # the mixture ends with beta's epoch
    with pytest.raises(ConfigError, match="data.num_epochs=1: the training stream of alpha, beta ends after"):
        pipeline.make_train_iterator(config, TOK, 0, 1)


def test_bad_sources_are_refused(sources, tmp_path):
    (a, _), _ = sources
    with pytest.raises(ConfigError, match="is not a prepared corpus"):
        pipeline.make_train_iterator(data_config(str(tmp_path)), TOK, 0, 1)
    with pytest.raises(ConfigError, match="data.sources entry"):
        config_lib.validate(data_config(f"{a}=-1"), 8)
    with pytest.raises(ConfigError, match="was prepared with tokenizer 'byte'"):
        from gqlm.tokenizers.bpe import train_bpe
        prepared.read_meta(a, train_bpe(["some text to learn"] * 20, 300, str(tmp_path / "bpe")))
    with pytest.raises(ConfigError, match="data.seq_len=100000 needs"):
        pipeline.make_eval_sets(data_config(a, seq_len=100_000), TOK, "validation", 1, 0, 1)


@pytest.mark.slow
def test_training_on_a_mixture_reports_bpb_per_source(sources, tmp_path):
    (a, _), (b, _) = sources
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "gqlm.train", "--config", "experiments/tiny_cpu.py:smoke", f"--workdir={tmp_path / 'w'}",
         "--config.data.corpus=prepared", f"--config.data.sources={a}=0.5,{b}=0.5", "--config.train.steps=4", "--config.train.sample_tokens=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = result.stdout.split("final validation: ")[1]
    metrics = dict(kv.split("=") for kv in final.strip().split(", "))
    assert {"bpb", "bpb/alpha", "bpb/beta"} <= set(metrics)
    assert min(float(metrics["bpb/alpha"]), float(metrics["bpb/beta"])) <= float(metrics["bpb"])
    assert float(metrics["bpb"]) <= max(float(metrics["bpb/alpha"]), float(metrics["bpb/beta"]))
