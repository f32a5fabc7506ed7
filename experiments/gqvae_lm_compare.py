"""The same small LM on any tokenizer, with the same training budget in BYTES: the fair comparison
of byte, BPE, VQ-VAE and GQ-VAE tokenizers (run for all of them by benchmarks/tokenizer_comparison.py).

    python -m gqlm.train --config experiments/gqvae_lm_compare.py:gqvae:workdirs/tok/gqvae_1k \
      --workdir workdirs/lm/gqvae_1k
    python -m gqlm.train --config experiments/gqvae_lm_compare.py:byte --workdir workdirs/lm/byte

The argument is a `data.tokenizer` spec, optionally followed by `,bpt=X` (the tokenizer's bytes per
token; measured on the first 256 KB of the train split when omitted) and `,smoke` (seconds, for tests).

Budget: every run takes `STEPS` steps of `BATCH` rows, and each row holds ~`BYTE_CONTEXT` bytes of
text: `data.seq_len = BYTE_CONTEXT / bytes_per_token` tokens. So every tokenizer sees the same
number of training bytes (and the same context in bytes); a coarser tokenizer spends fewer FLOPs on
them. Validation bits per byte is measured on the same first `EVAL_BATCHES` x `BATCH` x
`BYTE_CONTEXT` bytes of the validation split. On 2 shared CPU cores a run takes 1-3 minutes; at
this budget (1.2 MB of text, ~14% of one epoch) the numbers rank tokenizers, they do not show
converged models.
"""

import ml_collections

from gqlm.config import base_config
from gqlm.presets import apply_dense

BYTE_CONTEXT = 256
BATCH = 32
STEPS = 150
EVAL_BATCHES = 16
MEASURE_BYTES = 256 * 1024


def measured_bytes_per_token(spec: str, data: ml_collections.ConfigDict) -> float:
    """Bytes per token of `spec` on the start of the train split (the LM never sees validation here)."""
    from gqlm.data.corpora import load_documents
    from gqlm.tokenizers import load_tokenizer
    tokenizer = load_tokenizer(spec)
    text = "".join(load_documents(data, "train")[:])[:MEASURE_BYTES]
    ids = tokenizer.encode(text)
    return float(tokenizer.token_bytes()[ids].sum()) / max(len(ids), 1)


def get_config(arg: str = "byte") -> ml_collections.ConfigDict:
    spec, *options = arg.split(",")
    smoke, bpt = False, 0.0
    for option in options:
        if option == "smoke":
            smoke = True
        elif option.startswith("bpt="):
            bpt = float(option[4:])
        else:
            raise ValueError(f"unknown option {option!r} in {arg!r} (known: bpt=X, smoke)")
    config = base_config()
    apply_dense(config, "tiny")
    config.data.corpus = "shakespeare"
    config.data.tokenizer = spec
    bpt = bpt or measured_bytes_per_token(spec, config.data)
    context, batch, steps = (64, 8, 6) if smoke else (BYTE_CONTEXT, BATCH, STEPS)
    config.data.seq_len = max(8, round(context / bpt))
    config.data.batch_size = batch
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = max(1, steps // 10)
    config.train.steps = steps
    config.train.log_every = max(1, steps // 5)
    config.train.eval_every = steps
    config.train.eval_batches = 2 if smoke else EVAL_BATCHES
    config.train.checkpoint_every = steps
    config.train.sample_tokens = 0
    config.train.progress = False
    if smoke:
        config.model.num_layers, config.model.embed_dim, config.model.mlp_dim = 1, 32, 64
    return config
