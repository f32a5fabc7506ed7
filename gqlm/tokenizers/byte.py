"""Byte-level tokenizer: ids 0..255 are the bytes of `text_to_bytes(text)`, then bos, eos, pad."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from gqlm.tokenizers.base import bytes_to_text, fingerprint_of, read_manifest, text_to_bytes, write_manifest

FORMAT_VERSION = 1


class ByteTokenizer:
    kind = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text_to_bytes(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids without a Python list in between (the pipeline's fast path)."""
        return np.frombuffer(text_to_bytes(text), np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Special ids are dropped; any byte sequence decodes (see base.bytes_to_text)."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
        return bytes_to_text(ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes())

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        out[:256] = 1
        return out

    def fingerprint(self) -> str:
        return fingerprint_of(self.kind, str(FORMAT_VERSION))

    def save(self, path: str) -> None:
        write_manifest(path, self.kind, FORMAT_VERSION)

    @classmethod
    def load(cls, path: str) -> "ByteTokenizer":
        read_manifest(path, cls.kind, FORMAT_VERSION)
        return cls()
