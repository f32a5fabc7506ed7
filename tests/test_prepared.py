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


def test_long_documents_are_cut_into_records_and_windows_read_only_a_few(tmp_path, monkeypatch):
    """A document longer than RECORD_TOKENS is stored in pieces (so a training row never reads a
    whole long document) and the stream is unchanged: the reference is built from the texts."""
    from gqlm.data import shards
    monkeypatch.setattr(shards, "RECORD_TOKENS", 50)
    lengths = [0, 3, 49, 50, 51, 120, 400, 7, 1000, 2]
    texts = ["".join(RNG.choice(list("abc\n é"), n)) for n in lengths]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "long"
    meta = prepare(Spec((str(tmp_path / "long.jsonl"),), "byte", validation_fraction=0.0, shard_bytes=1_500), str(out))
    ids = [list(text_to_bytes(t)) for t in texts]
    tokens, doc_ids = packing.concat_documents(ids, TOK.bos_id, TOK.eos_id)
    train = meta["splits"]["train"]
    assert train["documents"] == len(texts) and train["tokens"] == sum(map(len, ids))
    assert train["records"] >= sum(max(1, -(-len(i) // 50)) for i in ids) and train["records"] > len(texts)
    split = prepared.PreparedSplit(str(out), "train", prepared.read_meta(str(out), TOK))
    assert len(split.paths) > 1 and split.length == len(tokens)
    assert all(len(r) <= 50 for r in split.records(range(split.num_records)))
    read = []
    real_records = split.records
    monkeypatch.setattr(split, "records", lambda indices: read.extend(real_records(indices)) or read[-len(indices):])
    for start in range(0, len(tokens), 7):
        read.clear()
        got_tokens, got_docs = split.window(start, 33)
        np.testing.assert_array_equal(got_tokens, tokens[start:start + 33])
        np.testing.assert_array_equal(got_docs, doc_ids[start:start + 33])
        assert sum(map(len, read)) <= 33 + 2 * 50  # the window's records only, never a whole long document
    texts_back = list(prepared.document_texts([split], [1.0], TOK))
    assert "".join(texts_back) == "".join(texts)  # GQ-VAE training reads the records' pieces
    assert max(map(len, texts_back)) <= 50 // 4 and len(texts_back) > len(texts)  # each a text piece


def test_text_pieces_cut_where_bpe_would_and_encode_the_same(tmp_path):
    from gqlm.data.prepare import text_pieces
    from gqlm.tokenizers.bpe import train_bpe
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(["the ", "cat ", "sat\n", "on\n\n", "é ", "mat. ", "  so", "x\r\n", "a\tb"], 3000))
    bpe = train_bpe([text], 300)
    for limit in (7, 60, 200):
        pieces = list(text_pieces(text, limit))
        assert "".join(pieces) == text and all(len(p) <= limit for p in pieces)
        assert len(pieces) >= len(text) // limit
        if limit >= 60:  # room for a pretokenizer cut in every piece (at 7, some fall back to plain cuts)
            assert sum((bpe.encode(p) for p in pieces), []) == bpe.encode(text), limit
    assert list(text_pieces("x" * 450, 200)) == ["x" * 200, "x" * 200, "x" * 50]  # nowhere to cut: cut anyway
    assert list(text_pieces("ab\ncd ef", 4)) == ["ab\n", "cd", " ef"]
    assert list(text_pieces("ab\n\ncd ef", 6)) == ["ab\n\ncd", " ef"]  # not after "\n\n" (one pretoken alone)
