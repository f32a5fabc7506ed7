"""gqlm tokenizers -> `tokenizer.json` + `tokenizer_config.json` for `PreTrainedTokenizerFast`.

BPE exports its HF tokenizer as it is; the byte tokenizer becomes a byte-level BPE without merges
whose id for each byte is the byte itself. BOS/EOS/PAD are added special tokens at gqlm's ids,
and `split_special_tokens` keeps transformers from matching their strings in text, so for any
valid Unicode string `AutoTokenizer(...).encode(text, add_special_tokens=False)` is gqlm's
`encode(text)` (strings with lone surrogates cannot be passed to HF tokenizers at all). The
GQ-VAE tokenizer has no transformers counterpart and is refused.
"""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from gqlm.config import ConfigError
from gqlm.tokenizers.base import Tokenizer
from gqlm.tokenizers.bpe import byte_to_unicode

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
EXPORTABLE = ("byte", "bpe")


def check_exportable(kind: str) -> None:
    """`kind`: a tokenizer's `kind`, or the value of config.data.tokenizer (`byte`, `bpe:DIR`, ...)."""
    kind = kind.partition(":")[0]
    if kind not in EXPORTABLE:
        raise ConfigError(f"data.tokenizer: a {kind!r} tokenizer cannot be exported (transformers has no "
                          f"such tokenizer); only {' and '.join(EXPORTABLE)} tokenizers can")


def byte_tokenizer() -> tokenizers.Tokenizer:
    """HF tokenizer with one token per byte, id = byte value (gqlm's ByteTokenizer ids 0..255)."""
    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def hf_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """The HF tokenizer of a gqlm byte / BPE tokenizer, special tokens at gqlm's ids."""
    check_exportable(getattr(tokenizer, "kind", type(tokenizer).__name__))
    hf = byte_tokenizer() if tokenizer.kind == "byte" else tokenizer.hf_tokenizer()
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                           for t in SPECIAL_TOKENS.values()])
    ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS.values()]
    wanted = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
    if ids != wanted:  # gqlm puts BOS/EOS/PAD right after the HF vocabulary
        raise ValueError(f"special tokens got ids {ids}, gqlm has {wanted}")
    return hf


def export_tokenizer(tokenizer: Tokenizer, out_dir: str, max_len: int) -> None:
    hf_tokenizer(tokenizer).save(os.path.join(out_dir, TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS, "split_special_tokens": True,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_len}
    with open(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
