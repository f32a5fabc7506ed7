"""Synthetic tasks: answers checked independently, determinism, the packing contract, the runner's
pipeline dispatch, exact-match accounting, and (slow) a tiny model that learns to copy."""

import os
import re

import numpy as np
import pytest

from gqlm.config import ConfigError, base_config, load_experiment, validate
from gqlm.data import pipeline, synthetic
from gqlm.eval.synthetic_eval import exact_match
from gqlm.tokenizers.byte import ByteTokenizer
from gqlm.train.tasks.lm import LMTask

TOK = ByteTokenizer()
KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_tasks.py")


def cfg(task, seq_len=64, batch=8, lo=2, hi=6, seed=0, k=2):
    c = base_config()
    c.data.corpus = f"synthetic:{task}"
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.data.synthetic_min_len, c.data.synthetic_max_len = lo, hi
    c.data.synthetic_seed, c.data.synthetic_parity_k = seed, k
    return c


def spec(task, **kw):
    return synthetic.Spec.from_config(cfg(task, **kw).data)


def sample(task, n, count=40, **kw):
    return synthetic.examples(spec(task, **kw), "train", 3, n, count)


# ----------------------------------------------------------------------------- the answers


@pytest.mark.parametrize("n", [1, 5, 17])
def test_copy_answer_is_the_prompt_string(n):
    for prompt, answer in sample("copy", n):
        assert prompt == answer + "|" and len(answer) == n and answer.isalpha() and answer.islower()


@pytest.mark.parametrize("n", [1, 4, 30])
def test_recall_answer_is_the_queried_keys_value(n):
    for prompt, answer in sample("recall", n):
        book, query = re.fullmatch(r"(.*);([a-z]{3})=", prompt).groups()
        pairs = [p.split(":") for p in book.split(",")]
        assert len(pairs) == n and len({k for k, _ in pairs}) == n  # unique keys
        assert all(re.fullmatch(r"[a-z]{3}", k) and re.fullmatch(r"\d{3}", v) for k, v in pairs)
        assert answer == dict(pairs)[query]


def test_parity_answer_is_the_xor_of_the_secret_bits():
    s = spec("parity", lo=6, hi=12, k=3, seed=5)
    secret = synthetic.parity_positions(s)
    assert len(set(secret.tolist())) == 3 and secret.max() < 6
    for n in (6, 9, 20):
        for prompt, answer in synthetic.examples(s, "train", 1, n, 50):
            bits = prompt.removesuffix("=")
            assert len(bits) == n and set(bits) <= {"0", "1"}
            xor = 0
            for i in secret:
                xor ^= bits[i] == "1"
            assert answer == str(int(xor))
    # The secret depends on the seed (and only on it): another seed, another subset (for some seed).
    others = {tuple(synthetic.parity_positions(spec("parity", lo=6, k=3, seed=q))) for q in range(6)}
    assert len(others) > 1


@pytest.mark.parametrize("n", [1, 3, 12])
def test_addition_answer_is_the_sum(n):
    for prompt, answer in sample("addition", n):
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
        assert len(a) == len(b) == n and len(answer) == n + 1
        assert int(answer) == int(a) + int(b)


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("task", ["copy", "recall", "parity", "addition", "phonebook"])
def test_rows_follow_the_batch_contract_with_loss_only_on_answers(task):
    s, seq = spec(task, seq_len=96, lo=2, hi=6), 96
    for row in range(4):
        b = synthetic.pack_row(s, TOK, seq, "train", row)
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            k: ((1, seq), np.float32 if k == "loss_mask" else np.int32) for k in KEYS}
        inp, tgt, pos, seg, mask = (b[k][0] for k in KEYS)
        num = seg.max()
        expected = synthetic.examples(s, "train", row, None, num)
        for j, (prompt, answer) in enumerate(expected, start=1):
            at = np.flatnonzero(seg == j)
            # A whole example, never split. The row's last example's eos is only a target.
            ids = inp[at].tolist() + ([] if inp[at[-1]] == TOK.eos_id else [tgt[at[-1]]])
            assert ids == [TOK.bos_id] + TOK.encode(prompt + answer) + [TOK.eos_id]
            assert j == num or inp[at[-1]] == TOK.eos_id
            np.testing.assert_array_equal(pos[at], np.arange(len(at)))
            np.testing.assert_array_equal(inp[at[1:]], tgt[at[:-1]])
            assert TOK.decode(tgt[at][mask[at] > 0]) == answer  # loss on the answer only
        assert np.all(mask[seg == 0] == 0) and np.all(inp[seg == 0] == TOK.pad_id)
        # The row is full: the next example drawn would not have fit.
        nxt = synthetic.examples(s, "train", row, None, num + 1)[-1]
        used = int((seg > 0).sum()) + 1
        assert used + len(TOK.encode("".join(nxt))) + 2 > seq + 1


def test_stream_is_deterministic_by_seed_and_split():
    a = synthetic.pack_rows(spec("copy"), TOK, 64, "train", np.arange(4))
    b = synthetic.pack_rows(spec("copy"), TOK, 64, "train", np.arange(4))
    c = synthetic.pack_rows(spec("copy", seed=1), TOK, 64, "train", np.arange(4))
    v = synthetic.pack_rows(spec("copy"), TOK, 64, "validation", np.arange(4))
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"]) and not np.array_equal(a["inputs"], v["inputs"])


def test_fixed_length_rows_hold_only_that_length_and_grow_to_fit():
    c = cfg("copy", seq_len=16, lo=1, hi=4)
    (batch,) = synthetic.length_batches(c, TOK, 20, 1, 0, 8)
    assert batch["inputs"].shape == (8, 2 * 20 + 2)  # one example of 43 tokens -> rows of 42
    assert np.all(batch["loss_mask"].sum(1) == 20)


def test_pipeline_dispatch_slices_processes_and_resumes():
    c = cfg("addition", batch=8)
    full = next(pipeline.make_train_iterator(c, TOK, 0, 1))
    halves = [next(pipeline.make_train_iterator(c, TOK, p, 2)) for p in range(2)]
    for k in KEYS:
        np.testing.assert_array_equal(full[k], np.concatenate([h[k] for h in halves]))
    it = pipeline.make_train_iterator(c, TOK, 0, 1)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    resumed = pipeline.make_train_iterator(c, TOK, 0, 1)
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(resumed)["inputs"], w["inputs"])
    evals = pipeline.make_eval_batches(c, TOK, "validation", 2, 0, 1)
    assert len(evals) == 2 and not np.array_equal(evals[0]["inputs"], full["inputs"])


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="data.seq_len=16 is too short"):
        next(pipeline.make_train_iterator(cfg("recall", seq_len=16), TOK, 0, 1))
    with pytest.raises(ConfigError, match="data.synthetic_parity_k=5"):
        validate(cfg("parity", lo=3, k=5), 8)
    with pytest.raises(ConfigError, match="data.synthetic_min_len=6"):
        validate(cfg("copy", lo=6, hi=2), 8)
    with pytest.raises(ConfigError, match="data.corpus='synthetic:sort'"):
        validate(cfg("sort"), 8)
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        pipeline.make_eval_batches(cfg("copy"), TOK, "test", 1, 0, 1)


def test_exact_match_needs_every_answer_token_right():
    mask = np.array([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]], np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 0, 0]])
    correct = np.array([[0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    # Examples: (0,1) has a wrong token, (0,2) right, (1,1) right; (1,2) has no answer tokens.
    assert exact_match(correct, mask, seg) == (2, 3)


def test_a_padded_vocabulary_id_never_counts_as_the_prediction():
    """The model's vocabulary is the tokenizer's rounded up to 128; decoding never emits the padded
    ids, so exact match takes the argmax over the tokenizer's ids only (reference: numpy argmax of
    that slice)."""
    import jax.numpy as jnp
    from gqlm.eval.synthetic_eval import argmax_correct
    V, real = 384, TOK.vocab_size  # the byte tokenizer's ids, padded to 384
    rng = np.random.default_rng(0)
    logits_BTV = rng.normal(size=(2, 5, V)).astype(np.float32)
    logits_BTV[0, 1, 300] = logits_BTV[1, 3, real] = 50.0  # padded ids with the largest logit
    targets_BT = logits_BTV[..., :real].argmax(-1)
    got = np.asarray(argmax_correct(jnp.asarray(logits_BTV), jnp.asarray(targets_BT), real))
    assert got.all()  # every position's best real token is its target
    assert not np.asarray(argmax_correct(jnp.asarray(logits_BTV), jnp.asarray(targets_BT)))[0, 1]  # unmasked


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_learns_to_copy_short_strings(tmp_path):
    import jax
    from gqlm.config import apply_override_strings
    from gqlm.eval.synthetic_eval import accuracy_by_length
    from gqlm.train.checkpoint import restore_trained
    from gqlm.train.loop import train

    config = apply_override_strings(load_experiment(EXPERIMENT + ":copy,smoke"), {
        "data.synthetic_max_len": "3", "data.seq_len": "32", "data.batch_size": "32",
        "train.steps": "300", "train.eval_every": "300", "train.checkpoint_every": "300",
        "optimizer.warmup_steps": "20", "train.compile_cache_dir": ""})
    train(config, str(tmp_path), LMTask())
    exp, _, state = restore_trained(str(tmp_path), LMTask())
    with jax.set_mesh(exp.mesh):
        acc = accuracy_by_length(exp, state.params, [2, 3], num_batches=1)
    assert acc[2]["examples"] > 50 and acc[2]["accuracy"] > 0.9 and acc[3]["accuracy"] > 0.8, acc
