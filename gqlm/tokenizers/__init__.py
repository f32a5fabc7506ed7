"""Tokenizers, inference only: byte, BPE (HF `tokenizers`) and GQ-VAE (a trained model's segmenter).

`load_tokenizer(spec)` is the registry: `config.data.tokenizer` -> a Tokenizer. Training a
tokenizer lives elsewhere (`gqlm.tokenize` for BPE, `gqlm/train/tasks/gqvae` for the GQ-VAE model).
"""

from __future__ import annotations

import os
from typing import Callable

from gqlm.config import ConfigError
from gqlm.tokenizers.base import Tokenizer, read_manifest
from gqlm.tokenizers.bpe import BPETokenizer
from gqlm.tokenizers.byte import ByteTokenizer


def _load_gqvae(path: str) -> Tokenizer:
    # Imported on use: JAX and Flax take ~2 s to import, which every process that only needs
    # bytes or BPE (each gqlm.prepare worker, each grain worker) would otherwise pay.
    from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
    return GQVAETokenizer.load(path)


# kind -> loader of a tokenizer directory (`kind:DIR`); `byte` needs no directory.
DIRECTORY_KINDS: dict[str, Callable[[str], Tokenizer]] = {"bpe": BPETokenizer.load, "gqvae": _load_gqvae}


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, `bpe:DIR` or `gqvae:DIR` (the value of config.data.tokenizer)."""
    kind, sep, path = spec.partition(":")
    if kind == "byte" and not sep:
        return ByteTokenizer()
    if kind in DIRECTORY_KINDS and path:
        path = os.path.expanduser(path)
        read_manifest(path, kind)  # Fails early, naming the path, for the wrong kind of dir.
        return DIRECTORY_KINDS[kind](path)
    raise ConfigError(f"data.tokenizer={spec!r} must be 'byte', 'bpe:DIR' or 'gqvae:DIR'")
