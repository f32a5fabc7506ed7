"""The Tokenizer protocol, the lossless text <-> bytes mapping every tokenizer shares, and the
manifest every tokenizer directory carries.

Lossless bytes for ANY Python str
---------------------------------
Tokenizers work on bytes, but a Python str may hold lone surrogates: text read with
`errors="surrogateescape"` carries each undecodable byte b as U+DC00+b, and arbitrary strings
may hold any of U+D800..U+DFFF. UTF-8 cannot encode those, and plain `surrogateescape` is
ambiguous ("\\udcc3\\udca9" and "é" both become C3 A9). So `text_to_bytes` uses:

* non-surrogate characters -> their UTF-8 bytes (so ordinary text is plain UTF-8);
* U+DC80..U+DCFE (escaped raw bytes) -> the raw byte itself, so file bytes stay file bytes;
* every other surrogate (and U+DCFF) -> an escape `FF p q`: 0xFF never occurs in UTF-8, and
  p, q in 0x80..0xBF carry the 11-bit offset from U+D800 (p < 0xA0).

`bytes_to_text` splits at escapes and decodes the rest with `surrogateescape`. When putting raw
bytes back would not decode to the same string (escaped bytes that happen to form valid UTF-8,
or neighbour an escape badly), `text_to_bytes` escapes every surrogate of that string instead,
which always round-trips. Hence `bytes_to_text(text_to_bytes(s)) == s` for every str, and
`bytes_to_text` accepts any byte string (model samples), never raising.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from gqlm.config import ConfigError

MANIFEST = "gqlm_tokenizer.json"

_SURROGATE_LO, _SURROGATE_HI = 0xD800, 0xDFFF
_ESCAPE_RE = re.compile(rb"\xff([\x80-\x9f][\x80-\xbf])")


def _escape(cp: int) -> bytes:
    offset = cp - _SURROGATE_LO
    return bytes((0xFF, 0x80 | (offset >> 6), 0x80 | (offset & 0x3F)))


def _raw_or_escape(err: UnicodeEncodeError) -> tuple[bytes, int]:
    chunk = err.object[err.start:err.end]
    out = b"".join(bytes((ord(c) - 0xDC00,)) if 0xDC80 <= ord(c) <= 0xDCFE else _escape(ord(c))
                   for c in chunk)
    return out, err.end


def _escape_all(err: UnicodeEncodeError) -> tuple[bytes, int]:
    return b"".join(_escape(ord(c)) for c in err.object[err.start:err.end]), err.end


codecs.register_error("gqlm_raw_or_escape", _raw_or_escape)
codecs.register_error("gqlm_escape_all", _escape_all)


def text_to_bytes(text: str) -> bytes:
    """Injective str -> bytes: UTF-8, escaped raw bytes kept raw where unambiguous (module doc)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    data = text.encode("utf-8", "gqlm_raw_or_escape")
    if bytes_to_text(data) == text:
        return data
    return text.encode("utf-8", "gqlm_escape_all")


def bytes_to_text(data: bytes) -> str:
    """Inverse of `text_to_bytes`; total on arbitrary bytes (never raises)."""
    if b"\xff" not in data:
        return data.decode("utf-8", "surrogateescape")
    parts = _ESCAPE_RE.split(data)  # [text, payload, text, payload, ..., text]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(chr(_SURROGATE_LO + ((part[0] & 0x3F) << 6 | (part[1] & 0x3F))))
        else:
            out.append(part.decode("utf-8", "surrogateescape"))
    return "".join(out)


def has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


@runtime_checkable
class Tokenizer(Protocol):
    """Every gqlm tokenizer. `encode` never fails and adds no BOS/EOS; decode(encode(t)) == t."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self) -> np.ndarray: ...

    def fingerprint(self) -> str: ...

    def save(self, path: str) -> None: ...

    @classmethod
    def load(cls, path: str) -> "Tokenizer": ...


# ----------------------------------------------------------------------------- manifests


class TokenizerDirError(ConfigError):
    """A tokenizer directory is missing, broken, or of another kind/version."""


def write_manifest(path: str, kind: str, format_version: int, **extra) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"kind": kind, "format_version": format_version, **extra}, f, indent=1)


def read_manifest(path: str, kind: str | None = None, format_version: int | None = None) -> dict:
    """Reads the manifest of a tokenizer dir, checking kind/version; one-line errors."""
    where = f"data.tokenizer: tokenizer directory {path!r}"
    if not os.path.isdir(path):
        raise TokenizerDirError(f"{where} does not exist")
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerDirError(f"{where} has no readable {MANIFEST} ({type(e).__name__})")
    if not isinstance(manifest, dict):
        raise TokenizerDirError(f"{where}: {MANIFEST} holds a JSON {type(manifest).__name__}, not an object")
    if kind is not None and manifest.get("kind") != kind:
        raise TokenizerDirError(f"{where} holds a {manifest.get('kind')!r} tokenizer, not {kind!r}")
    if format_version is not None and manifest.get("format_version") != format_version:
        raise TokenizerDirError(
            f"{where} has format_version {manifest.get('format_version')!r}; "
            f"this gqlm reads {kind} format_version {format_version}")
    return manifest


def fingerprint_of(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]
