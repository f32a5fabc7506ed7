"""Byte-level BPE (HF `tokenizers`), trained by gqlm, lossless for every Python str.

HF tokenizers take only valid Unicode, so a string with lone surrogates is first mapped to bytes
(`base.text_to_bytes`), those bytes are read back with `surrogateescape`, and the result is cut
into runs of valid text (encoded by HF) and runs of undecodable bytes (one byte token each).
Decoding maps every id to its bytes and applies `base.bytes_to_text`. BOS/EOS/PAD live past the
HF vocabulary, so no text can ever produce them (HF would match special-token strings in text).
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gqlm.config import ConfigError
from gqlm.tokenizers.base import (
    TokenizerDirError, bytes_to_text, fingerprint_of, has_surrogates, read_manifest, text_to_bytes, write_manifest)

FORMAT_VERSION = 1
HF_FILE = "tokenizer.json"
# HF's trainer allocates tables of vocab_size entries up front (~70 bytes each): vocab_size=2e9
# aborted the process asking for 141 GB. No model's vocabulary comes near this bound.
MAX_VOCAB = 1 << 22
_UNDECODABLE = re.compile("([\udc80-\udcff]+)")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of HF's ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _valid_pieces(text: str) -> list[str]:
    """[valid, undecodable, valid, ...] pieces of `text`'s canonical bytes (see module doc)."""
    return _UNDECODABLE.split(text_to_bytes(text).decode("utf-8", "surrogateescape"))


class BPETokenizer:
    kind = "bpe"

    def __init__(self, hf: tokenizers.Tokenizer):
        self._hf = hf
        self._json = hf.to_str()
        unicode_to_byte = {c: b for b, c in byte_to_unicode().items()}
        n = hf.get_vocab_size()
        self._id_bytes = [b""] * (n + 3)
        for token, i in hf.get_vocab().items():
            self._id_bytes[i] = bytes(unicode_to_byte[c] for c in token)
        byte_ids = [hf.token_to_id(c) for c in byte_to_unicode().values()]
        if None in byte_ids:
            raise ValueError("BPE vocabulary lacks some single-byte tokens")
        self._byte_id = np.array(byte_ids, np.int64)
        self.bos_id, self.eos_id, self.pad_id = n, n + 1, n + 2
        self.vocab_size = n + 3

    # --------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        clean = [i for i, t in enumerate(texts) if not has_surrogates(t)]
        out: list[list[int] | None] = [None] * len(texts)
        for i, enc in zip(clean, self._hf_encode([texts[i] for i in clean])):
            out[i] = enc
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_with_surrogates(t)
        return out

    def _hf_encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def _encode_with_surrogates(self, text: str) -> list[int]:
        pieces = _valid_pieces(text)
        encoded = iter(self._hf_encode(pieces[0::2]))
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids.extend(next(encoded))
            else:  # Undecodable bytes, one token each.
                ids.extend(self._byte_id[list(piece.encode("utf-8", "surrogateescape"))].tolist())
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Special and out-of-range ids are dropped."""
        table, n = self._id_bytes, len(self._id_bytes)
        return bytes_to_text(b"".join(table[i] for i in ids if 0 <= i < n))

    # --------------------------------------------------------------------- metadata

    def token_bytes(self) -> np.ndarray:
        return np.array([len(b) for b in self._id_bytes], np.int32)

    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """A copy of the underlying HF tokenizer (without gqlm's BOS/EOS/PAD), e.g. for export."""
        return tokenizers.Tokenizer.from_str(self._json)

    def fingerprint(self) -> str:
        return fingerprint_of(self.kind, str(FORMAT_VERSION), self._json)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, HF_FILE + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(self._json)
        os.replace(tmp, os.path.join(path, HF_FILE))
        write_manifest(path, self.kind, FORMAT_VERSION, vocab_size=self.vocab_size)

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        read_manifest(path, cls.kind, FORMAT_VERSION)
        file = os.path.join(path, HF_FILE)
        try:  # HF raises a bare Exception ("EOF while parsing") that names no file
            return cls(tokenizers.Tokenizer.from_file(file))
        except Exception as e:  # a missing, cut or foreign (not byte-level: KeyError) tokenizer.json
            raise TokenizerDirError(f"data.tokenizer: {file!r} is not a readable byte-level BPE "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if has_surrogates(t):
            yield from (p for p in _valid_pieces(t)[0::2] if p)
        else:
            yield t


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | None = None) -> BPETokenizer:
    """Trains a byte-level BPE with `vocab_size` ids in all (3 of them BOS/EOS/PAD)."""
    if not 256 + 3 <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"BPE vocab_size={vocab_size} must lie in [259, {MAX_VOCAB}] (256 bytes + 3 specials "
                          "at least)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False)
    pieces = (piece for piece in _training_pieces(texts) if piece)
    first = next(pieces, None)
    if first is None:  # an empty corpus or sample: a tokenizer of bare bytes, saved as if trained, hid it
        raise ConfigError("BPE training got no text (the corpus or its sample is empty)")
    hf.train_from_iterator(itertools.chain([first], pieces), trainer=trainer)
    tok = BPETokenizer(hf)
    if out_dir:
        tok.save(out_dir)
    return tok
