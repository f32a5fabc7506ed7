"""grain pipeline: determinism, exact resume, process slicing, eval batches, to_global."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gqlm.config import ConfigError, base_config
from gqlm.data import corpora, pipeline
from gqlm.tokenizers.byte import ByteTokenizer

SEQ, BATCH = 16, 8
TOK = ByteTokenizer()
KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    for i in range(10):
        words = rng.choice(["to", "be", "or", "not", "é", "\n"], size=rng.integers(5, 60))
        (root / f"f{i}.txt").write_bytes(" ".join(words).encode() + bytes([0xFF]) * (i % 2))
    c = base_config()
    c.data.corpus, c.data.glob, c.data.data_dir = "text_files", str(root / "*.txt"), str(root / "tfds")
    c.data.seq_len, c.data.batch_size = SEQ, BATCH
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def stream_of(config, split="train"):
    """The split's whole token stream (tokens, document ids), as the prepared reader sees it."""
    (source,), _ = pipeline.open_split(config, TOK, split)
    return np.stack(source.window(0, source.length))


def test_batches_are_shuffled_windows_of_the_token_stream(config):
    tokens = stream_of(config)[0]
    docs = corpora.load_documents(config.data, "train")
    expected = sum(len(TOK.encode(d)) + 2 for d in docs)
    assert len(tokens) == expected
    num_rows = (len(tokens) - 1) // SEQ
    windows = {tuple(tokens[r * SEQ:(r + 1) * SEQ + 1]): r for r in range(num_rows)}
    epoch = take(pipeline.make_train_iterator(config, TOK), num_rows // BATCH)
    rows = []
    for batch in epoch:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((BATCH, SEQ), np.float32 if k == "loss_mask" else np.int32) for k in KEYS}
        for inp, tgt in zip(batch["inputs"], batch["targets"]):
            rows.append(windows[(*inp, tgt[-1])])
            np.testing.assert_array_equal(inp[1:], tgt[:-1])
    assert len(set(rows)) == len(rows)  # first epoch: no row twice
    assert rows != sorted(rows)  # and shuffled


def test_deterministic_and_exactly_resumable(config):
    first = take(pipeline.make_train_iterator(config, TOK), 6)
    it = pipeline.make_train_iterator(config, TOK)
    assert_same(take(it, 3), first[:3])
    state = it.get_state()
    assert_same(take(it, 3), first[3:])
    resumed = pipeline.make_train_iterator(config, TOK)
    resumed.set_state(state)
    assert_same(take(resumed, 3), first[3:])


def test_epochs_are_reshuffled(config):
    num_rows = (stream_of(config).shape[1] - 1) // SEQ
    batches = take(pipeline.make_train_iterator(config, TOK), -(-2 * num_rows // BATCH))
    inputs = np.concatenate([b["inputs"] for b in batches])
    first, second = inputs[:num_rows], inputs[num_rows:2 * num_rows]
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))
    assert not np.array_equal(first, second)


def test_process_slices_cover_the_global_batch(config):
    full = take(pipeline.make_train_iterator(config, TOK, 0, 1), 3)
    parts = [take(pipeline.make_train_iterator(config, TOK, p, 2), 3) for p in range(2)]
    for g, a, b in zip(full, *parts):
        for k in KEYS:
            assert a[k].shape == (BATCH // 2, SEQ)
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
    with pytest.raises(ConfigError, match="data.batch_size=8"):
        pipeline.make_train_iterator(config, TOK, 0, 3)


def test_eval_batches(config):
    a = stream_of(config, "validation")
    tokens, docs = a[0], a[1]
    batches = pipeline.make_eval_batches(config, TOK, "validation", num_batches=100)
    assert 1 <= len(batches) < 100
    rows = np.concatenate([b["inputs"] for b in batches])
    # Unshuffled: the real inputs, in order, are the stream minus its last token.
    real = np.concatenate([b["segment_ids"] for b in batches]) > 0
    np.testing.assert_array_equal(rows[real], tokens[:-1])
    mask = np.concatenate([b["loss_mask"] for b in batches])
    assert mask.sum() == np.sum(docs[1:] == docs[:-1])
    # The last batch is padded (segment 0) where the stream runs out; padding carries no loss.
    # (Which files land in validation depends on their paths, so the padding's size varies.)
    assert real.sum() == len(tokens) - 1 and (mask[~real] == 0).all()
    assert_same(pipeline.make_eval_batches(config, TOK, "validation", num_batches=1), batches[:1])
    halves = [pipeline.make_eval_batches(config, TOK, "validation", 1, p, 2)[0] for p in range(2)]
    for k in KEYS:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batches[0][k])


def test_the_builtin_corpus_is_prepared_once_per_tokenizer(config, tmp_path):
    path = pipeline.builtin_prepared(config.data, TOK)
    mtime = os.stat(os.path.join(path, "meta.json")).st_mtime_ns
    assert pipeline.builtin_prepared(config.data, TOK) == path
    assert os.stat(os.path.join(path, "meta.json")).st_mtime_ns == mtime
    from gqlm.tokenizers.bpe import train_bpe
    bpe = train_bpe(corpora.load_documents(config.data, "train")[:], 300, str(tmp_path / "bpe"))
    assert pipeline.builtin_prepared(config.data, bpe) != path


def test_a_killed_first_use_leaves_nothing_behind_once_prepared(config, tmp_path):
    import shutil
    path = pipeline.builtin_prepared(config.data, TOK)
    shutil.rmtree(path)
    stale = f"{path}.tmp-999999"  # what a process killed while preparing leaves
    os.makedirs(os.path.join(stale, "train"))
    assert pipeline.builtin_prepared(config.data, TOK) == path and os.path.exists(os.path.join(path, "meta.json"))
    assert not os.path.exists(stale)


def test_seq_len_longer_than_split(config):
    c = config.copy_and_resolve_references()
    c.data.seq_len = 10**6
    with pytest.raises(ConfigError, match="data.seq_len=1000000"):
        pipeline.make_train_iterator(c, TOK)


def test_to_global_on_8_devices(config):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = next(pipeline.make_train_iterator(config, TOK))
    out = pipeline.to_global(batch, NamedSharding(mesh, P("data", None)))
    for k in KEYS:
        assert out[k].shape == (BATCH, SEQ) and out[k].dtype == batch[k].dtype
        assert len(out[k].sharding.device_set) == 8 and not out[k].sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(out[k]), batch[k])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(config):
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["pytest"])
    c = config.copy_and_resolve_references()
    c.data.worker_count = 1
    it = pipeline.make_train_iterator(c, TOK)
    want = take(pipeline.make_train_iterator(config, TOK), 6)
    assert_same(take(it, 4), want[:4])
    state = it.get_state()
    resumed = pipeline.make_train_iterator(c, TOK)
    resumed.set_state(state)
    assert_same(take(resumed, 2), want[4:])


def test_orbax_checkpoint_of_iterator_state(config, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    it = pipeline.make_train_iterator(config, TOK)
    take(it, 2)
    with ocp.CheckpointManager(str(tmp_path), item_names=("data",)) as mgr:
        mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        want = take(it, 3)
        restored = pipeline.make_train_iterator(config, TOK)
        mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same(take(restored, 3), want)
