"""Trains a tokenizer on a corpus's train split and reports bytes/token on its validation split.

    python -m gqlm.tokenize --kind bpe --corpus shakespeare --vocab_size 4096 --out /tmp/bpe4k
    python -m gqlm.tokenize --kind bpe --corpus text_files --glob 'notes/**/*.md' --out /tmp/bpe
    python -m gqlm.tokenize --kind gqvae --checkpoint workdirs/gqvae --vocab_size 1024 --out /tmp/gq1k

The result is used with `--config.data.tokenizer=bpe:/tmp/bpe4k`. New kinds register a builder
in `BUILDERS`: `fn(train_docs, flags) -> Tokenizer` that trains and saves to `--out`.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np
from absl import app, flags

from gqlm.config import ConfigError, base_config
from gqlm.data import corpora
from gqlm.tokenizers.base import Tokenizer
from gqlm.tokenizers.bpe import train_bpe
from gqlm.tokenizers.gqvae.tokenizer import build_gqvae_tokenizer
from gqlm.train.tasks.gqvae.checkpoint import load_checkpoint

_KIND = flags.DEFINE_string("kind", "bpe", "tokenizer kind; one of BUILDERS")
_CORPUS = flags.DEFINE_string("corpus", "shakespeare", "shakespeare | python_stdlib | text_files")
_GLOB = flags.DEFINE_string("glob", "", "files for --corpus=text_files")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data dir ('' = ~/.cache/gqlm/tfds)")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "total vocabulary size, specials included")
_OUT = flags.DEFINE_string("out", None, "output directory of the tokenizer")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "--kind=gqvae: a trained GQ-VAE workdir")


def build_bpe(train_docs: Sequence[str], fl: flags.FlagValues) -> Tokenizer:
    return train_bpe(train_docs, fl.vocab_size, fl.out)


def build_gqvae(train_docs: Sequence[str], fl: flags.FlagValues) -> Tokenizer:
    """Vocabulary from a trained GQ-VAE (a `python -m gqlm.train` workdir), built on `train_docs`."""
    if not fl.checkpoint:
        raise ConfigError("--kind=gqvae needs --checkpoint=DIR (a trained GQ-VAE workdir)")
    cfg, params = load_checkpoint(fl.checkpoint)
    return build_gqvae_tokenizer(cfg, params, fl.vocab_size, train_docs, fl.out)


# kind -> builder: fn(train_docs, flags) -> Tokenizer, saved to --out.
BUILDERS: dict[str, Callable[[Sequence[str], flags.FlagValues], Tokenizer]] = {
    "bpe": build_bpe, "gqvae": build_gqvae}


def bytes_per_token(tokenizer: Tokenizer, docs: Sequence[str]) -> float:
    lengths = np.asarray(tokenizer.token_bytes(), np.int64)
    n_tokens = n_bytes = 0
    for ids in tokenizer.encode_batch(list(docs)):
        n_tokens += len(ids)
        n_bytes += int(lengths[ids].sum()) if ids else 0
    return n_bytes / max(n_tokens, 1)


def main(argv: Sequence[str]) -> None:
    del argv
    if _KIND.value not in BUILDERS:
        raise app.UsageError(f"--kind={_KIND.value!r} must be one of {', '.join(sorted(BUILDERS))}")
    data = base_config().data
    data.corpus, data.glob, data.data_dir = _CORPUS.value, _GLOB.value, _DATA_DIR.value
    try:
        train = corpora.load_documents(data, "train")
        validation = corpora.load_documents(data, "validation")
        tokenizer = BUILDERS[_KIND.value](train[:], flags.FLAGS)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"{_KIND.value} tokenizer: vocab_size={tokenizer.vocab_size}, saved to {_OUT.value}")
    print(f"validation bytes/token: {bytes_per_token(tokenizer, validation[:]):.3f} "
          f"({len(validation)} documents of {data.corpus})")


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    app.run(main)
