"""The tokenization statistics of benchmarks/gqvae_code_vs_prose.py, on hand-counted examples, and the
tokenizer comparison's mean over LM seeds."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import token_stats  # noqa: E402


@pytest.mark.parametrize("token, expected", [
    ("the", "letters"), (" the", "space+letters"), ("snake_case", "identifier"), ("x2", "identifier"),
    ("\n    ", "whitespace"), ("  ", "whitespace"), ("):", "punctuation"), (" ==", "punctuation"),
    ("42", "digits"), ("e", "single byte"), ("\n", "single byte"), ("a.b", "other"),
])
def test_token_class(token, expected):
    assert token_stats.token_class(token) == expected


@pytest.mark.parametrize("left, right, expected", [
    ("e", "S", "lower|Upper"), ("a", "b", "letter|letter"), ("A", "b", "letter|letter"), (" ", "a", "space|word"),
    (" ", "7", "space|word"), ("4", "2", "digit|digit"), ("(", ")", "punct|punct"), ("x", "2", "other"),
    ("e", "_", "other"), ("\n", " ", "other"), ("é", "a", "other"),
])
def test_cut_context(left, right, expected):
    assert token_stats.cut_context(left, right) == expected


def test_analyse_counts_tokens_cuts_and_opportunities():
    pieces = ["get_value", " theSame", "()", " a"]
    tokens_of = [["get", "_", "value"], [" the", "Same"], ["()"], [" a"]]
    stats = token_stats.analyse(pieces, tokens_of, top=3)
    n_bytes, n_tokens = 9 + 8 + 2 + 2, 7
    assert stats["bytes_per_token"] == pytest.approx(n_bytes / n_tokens)
    # 3-10-byte pieces: get_value (cut), " theSame" (cut); "()" and " a" are 2 bytes.
    assert stats["pretoken_cut_share"] == 1.0
    # get_value: t|_ and _|v (other, both cut), g|e e|t v|a a|l l|u u|e (letter|letter, none cut).
    assert stats["cut_opportunities"]["other"] == 2 and stats["cut_rate_by_context"]["other"] == 1.0
    assert stats["cut_opportunities"]["lower|Upper"] == 1 and stats["cut_rate_by_context"]["lower|Upper"] == 1.0
    # letter|letter: get_value 6, " theSame" t|h h|e S|a a|m m|e = 5; none cut.
    assert stats["cut_opportunities"]["letter|letter"] == 11
    assert stats["cut_rate_by_context"]["letter|letter"] == 0.0
    # space|word: " theSame" and " a", neither cut; punct|punct: "()", not cut.
    assert stats["cut_opportunities"]["space|word"] == 2 and stats["cut_rate_by_context"]["space|word"] == 0.0
    assert stats["cut_rate_by_context"]["punct|punct"] == 0.0
    assert stats["cut_rate_by_context"]["digit|digit"] is None
    assert stats["token_classes"]["single byte"] == pytest.approx(1 / 7)
    assert stats["token_classes"]["space+letters"] == pytest.approx(2 / 7)
    assert [t for t, _ in stats["top_tokens"]] == ["get", "value", " the"]


def test_analyse_works_in_bytes_for_non_ascii_text():
    stats = token_stats.analyse(["café"], [["caf", "é"]], top=5)
    assert stats["bytes_per_token"] == pytest.approx(5 / 2)
    assert stats["cut_opportunities"]["other"] == 2  # f|0xc3 and 0xc3|0xa9
    assert stats["cut_rate_by_context"]["other"] == 0.5


def test_lm_seeds_averages_over_seeds_and_reports_the_first_failure():
    import lm_bpb
    row = {"kind": "bpe", "vocab_size": 4096}
    runs = [{"seed": s, "val_bpb": b, "lm_wall_s": 1.0, "lm_seq_len": 81} for s, b in [(0, 2.7), (1, 2.9), (2, 2.8)]]
    got = lm_bpb.lm_seeds(row, runs)
    assert got["val_bpb"] == pytest.approx(2.8) and got["val_bpb_std"] == pytest.approx(0.1)
    assert got["val_bpb_seeds"] == [2.7, 2.9, 2.8] and got["lm_seeds"] == [0, 1, 2] and got["lm_seq_len"] == 81
    assert lm_bpb.lm_seeds(row, runs[:1])["val_bpb_std"] == 0.0
    assert lm_bpb.lm_seeds(row, [runs[0], {"lm_error": "boom"}]) == {"lm_error": "boom"}
