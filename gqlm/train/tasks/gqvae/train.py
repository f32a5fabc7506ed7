"""Training a GQ-VAE tokenizer model in one call or one command, on the runner.

    python -m gqlm.train.tasks.gqvae.train --config experiments/gqvae_shakespeare.py[:arg] \
        --workdir DIR [--vocab_size N]

is `python -m gqlm.train` on a GQ-VAE experiment, then (with --vocab_size) the tokenizer built
from its checkpoint into DIR/tokenizer. `train_gqvae` trains on in-memory texts (tests, notebooks).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from absl import flags

from gqlm import cli
from gqlm.config import ConfigDict, ConfigError
from gqlm.data.corpora import load_documents
from gqlm.tokenizers.gqvae.tokenizer import FIRST_LEARNED, build_gqvae_tokenizer
from gqlm.train.loop import train
from gqlm.train.tasks.gqvae.checkpoint import load_checkpoint
from gqlm.train.tasks.gqvae.task import GQVAETask


def train_gqvae(config: ConfigDict, texts: Sequence[str], workdir: str, steps: int,
                log: Callable[[int, dict[str, float]], None] | None = None,
                log_every: int = 50) -> tuple[Any, list[dict[str, float]]]:
    """Trains the GQ-VAE of `config` (a full gqlm config) on in-memory `texts` (also its validation
    texts) with the runner, for `steps` steps; the runner's checkpoint lands in `workdir`.
    Returns (params, the logged train metrics)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.gqvae.train_tokenizer = True
        t = config.train
        t.steps, t.log_every, t.eval_every, t.checkpoint_every = steps, log_every, steps, steps
        t.eval_batches, t.progress, t.sample_tokens = 1, False, 0
    train(config, workdir, GQVAETask({"train": list(texts), "validation": list(texts)}))
    history = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.pop("split") == "train":
                history.append(row)
                if log:
                    log(row["step"], row)
    _, params = load_checkpoint(workdir)
    return params, history


def main(argv: Sequence[str]) -> None:
    del argv
    fl = flags.FLAGS
    config = cli.config()
    if not config.gqvae.train_tokenizer:
        raise ConfigError("--config: gqvae.train_tokenizer is False (not a GQ-VAE experiment)")
    if fl.vocab_size and fl.vocab_size < FIRST_LEARNED:  # refused before training, not after it
        raise ConfigError(f"--vocab_size={fl.vocab_size} must be 0 (no tokenizer) or at least {FIRST_LEARNED} "
                          "(256 bytes + 3 specials)")
    train(config, fl.workdir, GQVAETask())
    print(f"checkpoint: {fl.workdir}")
    if fl.vocab_size:
        out = os.path.join(fl.workdir, "tokenizer")
        cfg, params = load_checkpoint(fl.workdir)
        tok = build_gqvae_tokenizer(cfg, params, fl.vocab_size, load_documents(config.data, "train")[:], out)
        ids = tok.encode_batch(load_documents(config.data, "validation")[:])
        bpt = sum(int(tok.token_bytes()[i].sum()) for i in ids) / max(sum(map(len, ids)), 1)
        print(f"tokenizer: {out} (use data.tokenizer=gqvae:{out}); vocab_size={tok.vocab_size}, "
              f"validation bytes/token {bpt:.3f}")


if __name__ == "__main__":
    cli.define_config_file()
    flags.DEFINE_string("workdir", None, "the runner's workdir (checkpoints, metrics)", required=True)
    flags.DEFINE_integer("vocab_size", 0, "also build a tokenizer of this size (0: skip)")
    cli.run(main)
