"""Per-document scoring and CoLoR-Filter selection: selection logic on a mixture whose target
documents are known, the selected set as a runner corpus, scores that add up to the runner's own
evaluation, and one-line errors (foreign tokenizer, bad fraction, mismatched score files)."""

import os

import jax
import numpy as np
import pytest

from gqlm.config import ConfigError, apply_override_strings, apply_overrides, load_experiment
from gqlm.data import corpora, score_files, selection
from gqlm.tokenizers.base import text_to_bytes
from gqlm.train.tasks.lm import LMTask

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_color_filter_keeps_the_documents_the_target_model_prefers():
    rng = np.random.default_rng(0)
    n, target_like = 200, rng.choice(200, 50, replace=False)
    num_bytes = rng.integers(100, 5000, n).astype(float)
    prior = num_bytes * rng.uniform(1.0, 2.0, n)  # nats: the prior sees every document alike
    target = prior * 1.05  # ... the target-tuned model is a bit worse on generic text
    target[target_like] = prior[target_like] * 0.7  # and much better on target-like text
    keep = selection.select_top(selection.color_filter_scores(prior, target, num_bytes), 0.25)
    np.testing.assert_array_equal(keep, np.sort(target_like))
    # Summed nats instead favour long documents: a long generic one beats short target-like ones.
    prior2, target2, bytes2 = prior.copy(), target.copy(), num_bytes.copy()
    long_generic = np.setdiff1d(np.arange(n), target_like)[0]
    bytes2[long_generic] = 6e6  # 1.5 nats/byte under the prior, 10% better under the target model
    prior2[long_generic], target2[long_generic] = 1.5 * 6e6, 0.9 * 1.5 * 6e6
    assert long_generic in selection.select_top(selection.color_filter_scores(prior2, target2), 0.25)
    np.testing.assert_array_equal(
        selection.select_top(selection.color_filter_scores(prior2, target2, bytes2), 0.25), np.sort(target_like))


def test_select_top_fraction_ties_and_errors():
    np.testing.assert_array_equal(selection.select_top([1.0, 3.0, 3.0, 2.0], 0.5), [1, 2])
    np.testing.assert_array_equal(selection.select_top([0.0, 1.0, 1.0], 0.34), [1, 2])  # ceil(1.02) = 2
    assert len(selection.select_top(np.zeros(7), 1.0)) == 7
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="--fraction"):
            selection.select_top([1.0], bad)


def test_selected_documents_are_a_text_files_corpus_with_bytes_intact(tmp_path):
    docs = ["plain text\n", "café ☕", "raw \udcff\udcfe bytes", "x" * 300, "last"]
    out = tmp_path / "sel"
    selection.write_text_files(docs, np.array([1, 2, 4]), str(out))
    with pytest.raises(ConfigError, match="is not empty"):
        selection.write_text_files(docs, np.array([0]), str(out))
    config = load_experiment(os.path.join(ROOT, "experiments", "tiny_cpu.py:smoke"))
    data = apply_overrides(config, {"data.corpus": "text_files", "data.glob": str(out / "*.txt"),
                                    "data.data_dir": str(tmp_path / "tfds")}).data
    read = [d for s in ("train", "validation") for d in corpora.load_documents(data, s)]
    assert sorted(read) == sorted([docs[1], docs[2], docs[4]])
    assert (out / "000002.txt").read_bytes() == b"raw \xff\xfe bytes"  # the file bytes the doc came from


def test_mismatched_score_files_are_refused():
    meta = {"corpus": "text_files", "glob": "a/*.txt", "split": "train", "corpus_fingerprint": "x"}
    selection.check_same_documents(meta, dict(meta), 3, 3)
    with pytest.raises(ConfigError, match="split 'train' \\(prior\\) vs 'validation'"):
        selection.check_same_documents(meta, {**meta, "split": "validation"}, 3, 3)
    with pytest.raises(ConfigError, match="3 \\(prior\\) and 4 \\(target\\)"):
        selection.check_same_documents(meta, meta, 3, 4)


# ----------------------------------------------------------------------------- scoring a checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte-level model trained for a few steps on a small text_files corpus."""
    from gqlm.train.loop import train
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    for i in range(12):
        words = rng.choice(["the", "cat", "sat", "on", "mat", "é", "\n"], size=rng.integers(5, 80))
        (root / f"d{i:02d}.txt").write_text(" ".join(words))
    config = apply_override_strings(load_experiment(os.path.join(ROOT, "experiments", "tiny_cpu.py:smoke")), {
        "data.corpus": "text_files", "data.glob": str(root / "*.txt"), "data.data_dir": str(root / "tfds"),
        "train.steps": "4", "train.eval_every": "4", "train.checkpoint_every": "4", "train.sample_tokens": "0",
        "train.compile_cache_dir": ""})
    workdir = str(root / "work")
    train(config, workdir, LMTask())
    return workdir, config


def test_document_scores_add_up_to_the_runners_evaluation(trained, tmp_path):
    from gqlm import score
    from gqlm.data.pipeline import make_eval_batches
    from gqlm.train.checkpoint import restore_trained
    from gqlm.train.evaluation import evaluate
    from gqlm.train.step import make_eval_step
    workdir, _ = trained
    exp, step, state = restore_trained(workdir, LMTask())
    with jax.set_mesh(exp.mesh):
        scores = score.score_documents(exp, state.params, "train")
        batches = make_eval_batches(exp.config, exp.tokenizer, "train", 10**6)
        reference = evaluate(jax.jit(make_eval_step(exp.model.graphdef, exp.token_bytes)), state.params, batches,
                             exp.mesh, exp.config.mesh.rules)
    docs = corpora.load_documents(exp.config.data, "train")
    # Every document's targets: its bytes plus its EOS (the BOS is never a target).
    np.testing.assert_array_equal(scores["bytes"], [len(text_to_bytes(d)) for d in docs])
    np.testing.assert_array_equal(scores["tokens"], [len(exp.tokenizer.encode(d)) + 1 for d in docs])
    assert np.all(scores["nats"] > 0)
    total_tokens = scores["tokens"].sum()
    np.testing.assert_allclose(scores["nats"].sum() / total_tokens, reference["loss"], rtol=1e-5)

    path = str(tmp_path / "s.parquet")
    score_files.write_scores(path, scores, [docs.name(i) for i in range(len(docs))], {"split": "train"})
    columns, meta = score_files.read_scores(path)
    np.testing.assert_allclose(columns["nats"], scores["nats"])
    assert meta == {"split": "train"} and list(columns["name"]) == [docs.name(i) for i in range(len(docs))]


def test_a_score_file_write_that_dies_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "s.parquet")
    scores = {k: np.arange(3.0) for k in ("nats", "bytes", "tokens")}
    score_files.write_scores(path, scores, ["a", "b", "c"], {"v": 1})
    real = score_files.pq.write_table

    def dies_midway(table, where):
        real(table.slice(0, 1), where)  # a partial file on disk, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(score_files.pq, "write_table", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        score_files.write_scores(path, {k: v + 10 for k, v in scores.items()}, ["x", "y", "z"], {"v": 2})
    columns, meta = score_files.read_scores(path)
    assert meta == {"v": 1} and list(columns["name"]) == ["a", "b", "c"]
    assert os.listdir(tmp_path) == ["s.parquet"]  # and no temporary file is left behind


def test_a_score_file_without_a_column_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "s.parquet")
    score_files.write_scores(path, {k: np.arange(2.0) for k in ("nats", "bytes", "tokens")}, ["a", "b"], {"v": 1})
    table = score_files.pq.read_table(path)
    score_files.pq.write_table(table.drop(["nats"]), path)  # keeps the gqlm metadata
    with pytest.raises(ConfigError, match="is not a gqlm.score file .*nats"):
        score_files.read_scores(path)


def test_scoring_under_another_tokenizer_is_a_one_line_error(trained, tmp_path):
    from gqlm import score
    from gqlm.train.checkpoint import load_config
    workdir, _ = trained
    with pytest.raises(ConfigError, match="data.tokenizer='bpe:/x' differs from the tokenizer of the checkpoint"):
        score.checked_config(load_config(workdir), workdir, {"data.tokenizer": "bpe:/x"})
    with pytest.raises(ConfigError, match="not a gqlm.score file"):
        (tmp_path / "junk.parquet").write_text("no")
        score_files.read_scores(str(tmp_path / "junk.parquet"))


def test_score_files_whose_rows_differ_or_hold_nan_are_refused():
    """Same metadata and count but rows in another order would pair one document's prior loss with
    another's target loss; NaN losses would be ranked silently."""
    names = np.array(["a.txt", "b.txt", "c.txt"], dtype=object)
    prior = {"doc": np.arange(3), "name": names, "nats": np.array([1.0, 2.0, 3.0])}
    selection.check_same_rows(prior, {**prior})
    with pytest.raises(ConfigError, match="row 0 is name 'a.txt' \\(prior\\) vs 'c.txt' \\(target\\)"):
        selection.check_same_rows(prior, {**prior, "name": names[::-1]})
    with pytest.raises(ConfigError, match="target score file holds non-finite"):
        selection.check_same_rows(prior, {**prior, "nats": np.array([1.0, np.nan, 3.0])})


def test_out_that_is_a_file_or_a_changed_corpus_writes_nothing(tmp_path):
    out_file = tmp_path / "f"
    out_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        selection.write_text_files(["d0", "d1"], np.array([0]), str(out_file))
    out = tmp_path / "sel"
    with pytest.raises(ConfigError, match="holds 2 documents but the score files rank document 4"):
        selection.write_text_files(["d0", "d1"], np.array([0, 1, 4]), str(out))
    assert not out.exists()  # nothing half-written
