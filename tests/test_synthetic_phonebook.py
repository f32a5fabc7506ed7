"""Phonebook (memorization): a fixed book by seed, training queries only from it with the right
answers, an eval that asks every entry once (an oracle scores 100%, a constant guess ~chance), and
one-line errors for impossible book sizes and lengths."""

import os
import re

import numpy as np
import pytest

from gqlm.config import PHONEBOOK_NAMES, ConfigError, base_config, load_experiment, validate
from gqlm.data import pipeline, synthetic
from gqlm.eval.synthetic_eval import default_lengths, score_batches
from gqlm.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()
EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_tasks.py")


def cfg(size=300, lo=1, hi=3, seed=0, seq_len=32, batch=8):
    c = base_config()
    c.data.corpus, c.data.seq_len, c.data.batch_size = "synthetic:phonebook", seq_len, batch
    c.data.synthetic_min_len, c.data.synthetic_max_len = lo, hi
    c.data.synthetic_seed, c.data.synthetic_phonebook_size = seed, size
    return c


def book(**kw):
    return synthetic.phonebook(synthetic.Spec.from_config(cfg(**kw).data))


def test_book_is_fixed_by_seed_with_distinct_names_and_numbers_in_range():
    a, b, other = book(seed=3), book(seed=3), book(seed=4)
    assert a == b and a != other and len(a) == 300
    names = [name for name, _ in a]
    assert len(set(names)) == 300 and all(re.fullmatch(r"[a-z]{4}", n) for n in names)
    assert all(re.fullmatch(r"\d{1,3}", number) for _, number in a)
    assert {len(number) for _, number in a} == {1, 2, 3}  # 300 draws hit every length


def test_training_queries_come_only_from_the_book_with_its_answers():
    c = cfg(size=40)
    entries = dict(book(size=40))
    spec = synthetic.Spec.from_config(c.data)
    asked = set()
    for row in range(30):
        for prompt, answer in synthetic.examples(spec, "train", row, None, 10):
            name = prompt.removesuffix(":")
            assert prompt == name + ":" and entries[name] == answer
            asked.add(name)
    assert asked == set(entries)  # 300 uniform draws over 40 entries reach them all
    # Packed rows (the runner's batches): the loss falls exactly on the book's numbers.
    batch = next(pipeline.make_train_iterator(c, TOK, 0, 1))
    for inp, tgt, seg, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_mask"]):
        for j in range(1, seg.max() + 1):
            at = seg == j
            name = TOK.decode(inp[at][1:5])
            assert TOK.decode(tgt[at][mask[at] > 0]) == entries[name]


def oracle(entries):
    """Predicts each answer token by looking the name up (independently of the packing code)."""
    def correct(batch):
        pred = np.full(batch["targets"].shape, -1)
        for r, (inp, seg) in enumerate(zip(batch["inputs"], batch["segment_ids"])):
            for j in range(1, seg.max() + 1):
                start = np.flatnonzero(seg == j)[0]
                number = entries[TOK.decode(inp[start + 1:start + 5])]
                pred[r, start + 5:start + 5 + len(number)] = TOK.encode(number)  # targets after "name:"
        return pred == batch["targets"]
    return correct


@pytest.mark.parametrize("n", [1, 2, 3])
def test_eval_asks_every_entry_once_and_an_oracle_scores_100_percent(n):
    c = cfg(size=300)
    entries = dict(book(size=300))
    want = {name for name, number in entries.items() if len(number) == n}
    batches = synthetic.length_batches(c, TOK, n, 1, 0, 8)
    asked = []
    for b in batches:
        assert b["inputs"].shape == (8, 32)
        for inp, seg in zip(b["inputs"], b["segment_ids"]):
            asked += [TOK.decode(inp[seg == j][1:5]) for j in range(1, seg.max() + 1)]
    assert sorted(asked) == sorted(want)  # each n-digit entry once, no other entry
    assert score_batches(batches, oracle(entries)) == {"accuracy": 1.0, "token_accuracy": 1.0, "examples": len(want)}
    # Two processes' row slices together are the whole batches.
    halves = [synthetic.length_batches(c, TOK, n, 1, lo, hi) for lo, hi in ((0, 3), (3, 8))]
    for whole, a, b in zip(batches, *halves):
        np.testing.assert_array_equal(whole["inputs"], np.concatenate([a["inputs"], b["inputs"]]))


def test_a_constant_guess_scores_the_book_share_it_matches_near_chance():
    c = cfg(size=3000, lo=1, hi=2, seq_len=64, batch=16)
    entries = dict(book(size=3000, lo=1, hi=2))
    zero = TOK.encode("0")[0]
    for n, chance in ((1, 0.1), (2, 0.01)):
        numbers = [v for v in entries.values() if len(v) == n]
        got = score_batches(synthetic.length_batches(c, TOK, n, 1, 0, 16), lambda b: b["targets"] == zero)
        assert got["examples"] == len(numbers)
        assert got["accuracy"] == pytest.approx(sum(v == "0" * n for v in numbers) / len(numbers))
        assert got["token_accuracy"] == pytest.approx("".join(numbers).count("0") / (n * len(numbers)))
        assert abs(got["accuracy"] - chance) < 3 * np.sqrt(chance / len(numbers)) + 1e-3


def test_default_eval_lengths_are_the_books_number_lengths():
    assert default_lengths(cfg(lo=2, hi=4).data) == [2, 3, 4]


@pytest.mark.parametrize("size", [0, PHONEBOOK_NAMES + 1])
def test_impossible_book_sizes_are_one_line_config_errors(size):
    with pytest.raises(ConfigError, match=f"data.synthetic_phonebook_size={size} must lie in"):
        validate(cfg(size=size), 8)
    with pytest.raises(ConfigError, match=f"data.synthetic_phonebook_size={size} must lie in"):
        next(pipeline.make_train_iterator(cfg(size=size), TOK, 0, 1))  # also without validate()


def test_an_eval_length_the_book_lacks_is_a_one_line_error():
    with pytest.raises(ConfigError, match="length 5: no synthetic:phonebook entry has an 5-digit number"):
        synthetic.length_batches(cfg(lo=1, hi=3), TOK, 5, 1, 0, 8)


def test_bench_option_is_one_bucket_of_a_fixed_book_and_moe_matches_dense():
    from gqlm.models.flops import flops_per_token
    dense, moe = (load_experiment(f"{EXPERIMENT}:phonebook,bench{o}") for o in ("", ",moe"))
    for c in (dense, moe):
        c.model.vocab_size = TOK.vocab_size
        validate(c, 8)
    d = dense.data
    assert d.synthetic_min_len == d.synthetic_max_len and d.synthetic_phonebook_size >= 1000
    assert moe.model.moe.num_experts == 4 and moe.model.moe.mlp_dim * moe.model.moe.top_k == dense.model.mlp_dim
    ratio = flops_per_token(moe.model, d.seq_len) / flops_per_token(dense.model, d.seq_len)
    assert 1.0 < ratio < 1.01
