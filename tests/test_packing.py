"""Packing against a direct per-position Python loop on hand-made documents."""

import numpy as np
import pytest

from gqlm.data import packing

BOS, EOS, PAD = 100, 101, 102
DOCS = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [14] * 9, [15, 16, 17]]


def reference_stream():
    tokens, docs = [], []
    for d, ids in enumerate(DOCS):
        for t in [BOS, *ids, EOS]:
            tokens.append(t)
            docs.append(d)
    return tokens, docs


def reference_row(tokens, docs, row, seq_len):
    """One row, position by position, straight from the batch contract."""
    out = {k: [] for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    seg = pos = 0
    prev_doc = None
    for t in range(seq_len):
        i = row * seq_len + t
        if row < 0 or i + 1 >= len(tokens):  # no target: padding
            for k, v in (("inputs", PAD), ("targets", PAD), ("positions", 0), ("segment_ids", 0),
                         ("loss_mask", 0.0)):
                out[k].append(v)
            continue
        if docs[i] != prev_doc:
            seg, pos, prev_doc = seg + 1, 0, docs[i]
        out["inputs"].append(tokens[i])
        out["targets"].append(tokens[i + 1])
        out["positions"].append(pos)
        out["segment_ids"].append(seg)
        out["loss_mask"].append(1.0 if docs[i] == docs[i + 1] else 0.0)
        pos += 1
    return out


def test_concat_documents():
    tokens, docs = packing.concat_documents([np.array(d, np.int32) for d in DOCS], BOS, EOS)
    ref_tokens, ref_docs = reference_stream()
    assert tokens.dtype == docs.dtype == np.int32
    assert tokens.tolist() == ref_tokens and docs.tolist() == ref_docs


@pytest.mark.parametrize("seq_len", [1, 3, 5, 8, 40])
def test_pack_rows_matches_loop(seq_len):
    tokens, docs = packing.concat_documents(DOCS, BOS, EOS)
    n = packing.num_rows_covering(len(tokens), seq_len)
    rows = np.array([*range(n), -1, 0, n - 1], np.int64)
    batch = packing.pack_rows(tokens, docs, rows, seq_len, PAD)
    ref_tokens, ref_docs = reference_stream()
    for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("positions", np.int32),
                     ("segment_ids", np.int32), ("loss_mask", np.float32)):
        assert batch[k].dtype == dtype and batch[k].shape == (len(rows), seq_len)
        expected = [reference_row(ref_tokens, ref_docs, int(r), seq_len)[k] for r in rows]
        np.testing.assert_array_equal(batch[k], np.array(expected, dtype), err_msg=k)


@pytest.mark.parametrize("seq_len", [2, 7])
def test_row_counts_cover_every_target_once(seq_len):
    tokens, docs = packing.concat_documents(DOCS, BOS, EOS)
    n_full = packing.num_full_rows(len(tokens), seq_len)
    assert n_full * seq_len + 1 <= len(tokens) < (n_full + 1) * seq_len + 1
    rows = np.arange(packing.num_rows_covering(len(tokens), seq_len))
    batch = packing.pack_rows(tokens, docs, rows, seq_len, PAD)
    # Every in-document transition is a counted target exactly once: len(doc) + 1 per document.
    assert batch["loss_mask"].sum() == sum(len(d) + 1 for d in DOCS)
    assert (batch["segment_ids"] > 0).sum() == len(tokens) - 1
