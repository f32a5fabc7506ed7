"""How a GQ-VAE trained on code tokenizes differently from one trained on prose.

    python benchmarks/gqvae_robustness.py --variant robust --corpus python_stdlib --steps 400 --warmup 100 \
      --reseed_every 50 --batch_size 128 --gates bounded --weights 3 --targets 3 --seeds 0 --keep_dir workdirs/gqrob
    python benchmarks/gqvae_code_vs_prose.py \
      --models prose=shakespeare:workdirs/gqrob/PROSE_RUN,code=python_stdlib:workdirs/gqrob/CODE_RUN

Each model (NAME=CORPUS:WORKDIR) gets a tokenizer of --vocab_size ids built on its own corpus' train
split; every tokenizer then encodes the start (--max_bytes) of every corpus' validation split. Per
(tokenizer, text): bytes per token; the share of 3-10-byte pretokens cut inside; tokens by class
(letters, leading-space letters, identifier-like, whitespace, punctuation, digits, single bytes);
inside-pretoken cuts by the characters on either side (camelCase, snake_case, letter-letter, ...)
as a rate per opportunity; and the most frequent multi-byte tokens. These are the tokens an LM
sees (a segment outside the vocabulary is spelt in bytes), not the gate's raw cuts.
Writes --out (JSON) and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as gqlm.train

import sys  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script
from token_stats import CLASSES, CONTEXTS, analyse  # noqa: E402

flags.DEFINE_list("models", [], "NAME=CORPUS:WORKDIR of trained GQ-VAEs (CORPUS: the data.corpus it trained on)")
flags.DEFINE_integer("vocab_size", 4096, "tokenizer vocabulary size")
flags.DEFINE_integer("max_bytes", 1 << 20, "bytes of each validation split encoded")
flags.DEFINE_integer("top", 25, "most frequent multi-byte tokens listed")
flags.DEFINE_string("tok_dir", "workdirs/tok_code_vs_prose", "built tokenizers are kept (and reused) here")
flags.DEFINE_string("out", "benchmarks/results/gqvae_code_vs_prose.json", "JSON results")
FLAGS = flags.FLAGS
def models() -> dict[str, tuple[str, str]]:
    """NAME -> (corpus, workdir) of --models."""
    out = {}
    for entry in FLAGS.models:
        name, _, rest = entry.partition("=")
        corpus, _, workdir = rest.partition(":")
        if not (name and corpus and workdir):
            raise app.UsageError(f"--models entry {entry!r} is not NAME=CORPUS:WORKDIR")
        out[name] = (corpus, workdir)
    if not out:
        raise app.UsageError("--models is empty")
    return out


def documents(corpus: str, split: str) -> list[str]:
    from gqlm.config import base_config
    from gqlm.data.corpora import load_documents
    data = base_config().data
    data.corpus = corpus
    return load_documents(data, split)[:]


def tokenizer_of(name: str, corpus: str, workdir: str):
    """The --vocab_size tokenizer of a checkpoint, built on its corpus' train split (or reloaded)."""
    from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
    from gqlm.train.tasks.gqvae.checkpoint import load_checkpoint
    path = os.path.join(FLAGS.tok_dir, f"{name}_{FLAGS.vocab_size}")
    if not os.path.exists(os.path.join(path, "gqlm_tokenizer.json")):
        GQVAETokenizer.build(*load_checkpoint(workdir), FLAGS.vocab_size, documents(corpus, "train")).save(path)
    return GQVAETokenizer.load(path)


def encoded_pretokens(tokenizer, text: str) -> tuple[list[str], list[list[str]]]:
    """The pretokens of `text` and each one's tokens, as text (one pretoken is segmented on its own)."""
    from gqlm.tokenizers.gqvae.pretokenize import pretokens
    pieces = pretokens(text)
    ids_of = tokenizer.encode_batch(pieces)
    return pieces, [[tokenizer.decode([i]) for i in ids] for ids in ids_of]


def main(argv) -> None:
    del argv
    from absl import logging
    from timing import write_results
    logging.set_verbosity(logging.ERROR)
    named = models()
    texts = {corpus: "".join(documents(corpus, "validation"))[:FLAGS.max_bytes] for corpus, _ in named.values()}
    rows = []
    for name, (corpus, workdir) in named.items():
        tokenizer = tokenizer_of(name, corpus, workdir)
        for text_corpus, text in texts.items():
            stats = analyse(*encoded_pretokens(tokenizer, text), FLAGS.top)
            rows.append({"model": name, "trained_on": corpus, "workdir": workdir, "text": text_corpus, **stats})
            print(f"{name} on {text_corpus}: {stats['bytes_per_token']:.2f} bytes/token, "
                  f"{stats['pretoken_cut_share']:.2f} of 3-10-byte pretokens cut", flush=True)
    print(markdown(rows))
    write_results(FLAGS.out, {"command": " ".join(["python benchmarks/gqvae_code_vs_prose.py"] + sys.argv[1:]),
                              "vocab_size": FLAGS.vocab_size, "max_bytes": FLAGS.max_bytes, "rows": rows})


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["model", "text", "bytes/token", "3-10 cut"] + list(CLASSES) + [f"cut {c}" for c in CONTEXTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rates = [r["cut_rate_by_context"][c] for c in CONTEXTS]
        cells = [r["model"], r["text"], f"{r['bytes_per_token']:.2f}", f"{r['pretoken_cut_share']:.2f}"]
        cells += [f"{r['token_classes'][c]:.2f}" for c in CLASSES] + ["-" if x is None else f"{x:.2f}" for x in rates]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["text"] == r["trained_on"]:
            top = ", ".join(repr(t) for t, _ in r["top_tokens"])
            lines.append(f"\n{r['model']} on {r['text']}, top tokens: {top}")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
