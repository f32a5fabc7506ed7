"""Trains a tokenizer on a corpus's train split and reports bytes/token on its validation split.

    python -m gqlm.tokenize --kind bpe --corpus shakespeare --vocab_size 4096 --out /tmp/bpe4k
    python -m gqlm.tokenize --kind bpe --corpus text_files --glob 'notes/**/*.md' --out /tmp/bpe
    python -m gqlm.tokenize --kind bpe --input 'gs://B/raw/*.parquet' --text_key text \
        --vocab_size 32768 --sample_bytes 2000000000 --out /tmp/bpe32k
    python -m gqlm.tokenize --kind gqvae --checkpoint workdirs/gqvae --vocab_size 1024 --out /tmp/gq1k

With --input (the formats of gqlm.prepare), the tokenizer learns from a deterministic sample of
--sample_bytes, streamed (data/sources.py sample_documents): the corpus is never held whole. The
sample's documents that gqlm.prepare would hold out (its validation hash) measure bytes/token.

The result is used with `--config.data.tokenizer=bpe:/tmp/bpe4k`. New kinds register a builder
in `BUILDERS`: `fn(train_docs, flags) -> Tokenizer` that trains and saves to `--out`.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import flags

from gqlm import cli
from gqlm.config import ConfigError, base_config
from gqlm.data import corpora, sources
from gqlm.data.prepare import is_validation
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
_INPUT = flags.DEFINE_multi_string("input", None, "Raw corpus files (globs, local or gs://) instead of --corpus.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "--input: the text field of jsonl records and parquet rows.")
_FORMAT = flags.DEFINE_string("format", "", "--input: force one format (default: by extension).")
_SAMPLE = flags.DEFINE_integer("sample_bytes", 1 << 30, "--input: bytes of text the tokenizer learns from.")
_ON_BAD = flags.DEFINE_enum("on_bad_record", "raise", sources.ON_BAD_RECORD,
                            "--input: raise: stop at a malformed record; skip: leave it out (as gqlm.prepare's).")
_HELD_OUT = 0.005  # gqlm.prepare's default validation fraction


def build_bpe(train_docs: Iterable[str], fl: flags.FlagValues) -> Tokenizer:
    return train_bpe(train_docs, fl.vocab_size, fl.out)


def build_gqvae(train_docs: Iterable[str], fl: flags.FlagValues) -> Tokenizer:
    """Vocabulary from a trained GQ-VAE (a `python -m gqlm.train` workdir), built on `train_docs`."""
    if not fl.checkpoint:
        raise ConfigError("--kind=gqvae needs --checkpoint=DIR (a trained GQ-VAE workdir)")
    cfg, params = load_checkpoint(fl.checkpoint)
    return build_gqvae_tokenizer(cfg, params, fl.vocab_size, train_docs, fl.out)


# kind -> builder: fn(train_docs, flags) -> Tokenizer, saved to --out.
BUILDERS: dict[str, Callable[[Iterable[str], flags.FlagValues], Tokenizer]] = {
    "bpe": build_bpe, "gqvae": build_gqvae}


def bytes_per_token(tokenizer: Tokenizer, docs: Sequence[str]) -> float:
    lengths = np.asarray(tokenizer.token_bytes(), np.int64)
    n_tokens = n_bytes = 0
    for ids in tokenizer.encode_batch(list(docs)):
        n_tokens += len(ids)
        n_bytes += int(lengths[ids].sum()) if ids else 0
    return n_bytes / max(n_tokens, 1)


def input_documents() -> tuple[Iterator[str], list[str]]:
    """(training documents, streamed; the held-out ones, filled as the stream is read)."""
    held_out: list[str] = []

    def train() -> Iterator[str]:
        for text in sources.sample_documents(sources.expand(_INPUT.value), _SAMPLE.value, _TEXT_KEY.value,
                                             _FORMAT.value, _ON_BAD.value):
            if is_validation(text, _HELD_OUT):
                held_out.append(text)
            else:
                yield text
    return train(), held_out


def main(argv: Sequence[str]) -> None:
    del argv
    if _KIND.value not in BUILDERS:
        raise ConfigError(f"--kind={_KIND.value!r} must be one of {', '.join(sorted(BUILDERS))}")
    if not _OUT.value:
        raise ConfigError("--out is required")
    if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):  # found before the (long) build, not after
        raise ConfigError(f"--out={_OUT.value!r} is an existing file, not a directory")
    if _INPUT.value:
        if _SAMPLE.value <= 0:
            raise ConfigError(f"--sample_bytes={_SAMPLE.value} must be positive")
        train, validation = input_documents()
        where = f"{len(validation)} held-out documents of the --input sample"
    else:
        data = base_config().data
        data.corpus, data.glob, data.data_dir = _CORPUS.value, _GLOB.value, _DATA_DIR.value
        train = corpora.load_documents(data, "train")[:]
        validation = corpora.load_documents(data, "validation")[:]
        where = f"{len(validation)} documents of {data.corpus}"
    tokenizer = BUILDERS[_KIND.value](train, flags.FLAGS)
    print(f"{_KIND.value} tokenizer: vocab_size={tokenizer.vocab_size}, saved to {_OUT.value}")
    measured = f"{bytes_per_token(tokenizer, validation):.3f}" if validation else "n/a"
    print(f"validation bytes/token: {measured} ({where})")


if __name__ == "__main__":
    cli.run(main)
