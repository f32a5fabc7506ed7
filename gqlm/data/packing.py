"""Packing a token stream into fixed rows: inputs, targets, positions, segment_ids, loss_mask.

The split's documents, each `[bos] + ids + [eos]`, are concatenated into one token stream with a
parallel document-id stream. Row r is the window [r*T, r*T + T + 1) of the stream; inputs are
window[:-1], targets window[1:]. A position is real when its target exists (the stream's end may
cut the last row short; row index -1 is a padding row). Within a row, documents are renumbered
1.. (`segment_ids`, 0 = padding), `positions` restart at 0 at each document start and at the row
start, and `loss_mask` is 1 where input and target belong to the same document.
Letters: R rows, T sequence length, W = T + 1 window.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

# The batch contract: every key is [rows, seq_len].
BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
                "loss_mask": np.float32}


def concat_documents(docs: Iterable[np.ndarray | list[int]], bos_id: int, eos_id: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_ids) int32 streams of `[bos] + doc + [eos]` for every document."""
    tokens, doc_ids = [], []
    for i, ids in enumerate(docs):
        ids = np.asarray(ids, np.int32)
        tokens.append(np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int32))
        doc_ids.append(np.full(len(ids) + 2, i, np.int32))
    if not tokens:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(tokens), np.concatenate(doc_ids)


def num_full_rows(stream_len: int, seq_len: int) -> int:
    """Rows whose whole window lies in the stream (training)."""
    return max(stream_len - 1, 0) // seq_len


def num_rows_covering(stream_len: int, seq_len: int) -> int:
    """Rows needed so every token but the first is a target exactly once (evaluation)."""
    return -(-max(stream_len - 1, 0) // seq_len)


def pack_rows(tokens: np.ndarray, doc_ids: np.ndarray, rows: np.ndarray, seq_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """The batch dict for `rows` (row indices into the stream; -1 = padding row)."""
    rows = np.asarray(rows, np.int64)
    n = len(tokens)
    idx_RW = rows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    exists_RW = (rows[:, None] >= 0) & (idx_RW < n)
    idx_RW = np.where(exists_RW, idx_RW, 0)
    tok_RW = np.asarray(tokens[idx_RW.ravel()]).reshape(idx_RW.shape)
    doc_RW = np.asarray(doc_ids[idx_RW.ravel()]).reshape(idx_RW.shape)
    real_RT = exists_RW[:, 1:]  # A position is real when its target exists.

    doc_RT = doc_RW[:, :-1]
    starts_RT = np.ones_like(real_RT)
    starts_RT[:, 1:] = doc_RT[:, 1:] != doc_RT[:, :-1]
    t_RT = np.broadcast_to(np.arange(seq_len), real_RT.shape)
    start_pos_RT = np.maximum.accumulate(np.where(starts_RT, t_RT, 0), axis=1)
    batch = {
        "inputs": np.where(real_RT, tok_RW[:, :-1], pad_id),
        "targets": np.where(real_RT, tok_RW[:, 1:], pad_id),
        "positions": np.where(real_RT, t_RT - start_pos_RT, 0),
        "segment_ids": np.where(real_RT, np.cumsum(starts_RT, axis=1), 0),
        "loss_mask": real_RT & (doc_RW[:, 1:] == doc_RT),
    }
    return {k: v.astype(BATCH_DTYPES[k]) for k, v in batch.items()}
