"""Text -> pretokens -> byte pieces of at most `max_pretoken_len` bytes.

Pretokens come from the GPT-2 regex applied to the text; each is encoded to bytes and cut into
pieces. `bytes_to_text` of the pieces' concatenation is the text (a pretoken boundary is never
inside a multi-byte sequence or an escape), so any segmentation of the pieces is lossless.

Text <-> bytes is gqlm.tokenizers.base's shared lossless mapping (lone surrogates included).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import regex

from gqlm.tokenizers.base import text_to_bytes

GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
BYTE_PAD = 256  # the byte-embedding id of padding positions


def pretokens(text: str) -> list[str]:
    """GPT-2 pretokens of `text`; their concatenation is `text`. The GIL is released meanwhile,
    so a worker thread (the tokenizer's model) runs alongside."""
    return GPT2_PATTERN.findall(text, concurrent=True)


def split_piece(data: bytes, max_len: int) -> list[bytes]:
    return [data[i:i + max_len] for i in range(0, len(data), max_len)]


def pieces(text: str, max_len: int) -> Iterator[bytes]:
    """Byte pieces of at most `max_len` bytes; `bytes_to_text` of their concatenation is `text`."""
    for p in pretokens(text):
        yield from split_piece(text_to_bytes(p), max_len)


def pack_pieces(chunks: Sequence[bytes], max_len: int, rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[N, max_len] int32 bytes (BYTE_PAD after the end) and [N] int32 lengths; with `rows` > N,
    padded with empty rows (length 0) to `rows`."""
    n = max(rows, len(chunks))
    out = np.full((n, max_len), BYTE_PAD, np.int32)
    lengths = np.zeros((n,), np.int32)
    lengths[:len(chunks)] = np.fromiter(map(len, chunks), np.int32, len(chunks))
    flat = np.frombuffer(b"".join(chunks), np.uint8)
    if flat.size:  # Scatter all bytes at once: row r, column = offset within its chunk.
        starts = np.cumsum(lengths) - lengths
        row = np.repeat(np.arange(n), lengths)
        out[row, np.arange(flat.size) - starts[row]] = flat
    return out, lengths


def corpus_pieces(texts: Iterable[str], max_len: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All pieces of `texts` (in order, repeats kept), at most `limit` of them if `limit` > 0."""
    chunks: list[bytes] = []
    for text in texts:
        chunks.extend(pieces(text, max_len))
        if limit and len(chunks) >= limit:
            chunks = chunks[:limit]
            break
    return pack_pieces(chunks, max_len)
