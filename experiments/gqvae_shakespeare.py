"""GQ-VAE tokenizer model on Shakespeare (byte-level, learned variable-length tokens).

    python -m gqlm.tokenizers.gqvae.train --config experiments/gqvae_shakespeare.py --workdir workdirs/gqvae
    python -m gqlm.tokenizers.gqvae.train --config experiments/gqvae_shakespeare.py:vqvae --workdir workdirs/vqvae
    python -m gqlm.tokenize --kind gqvae --checkpoint workdirs/gqvae --vocab_size 1024 --out workdirs/gqvae_1k

Trains the GQ-VAE for `train.steps` steps on the train split and saves the checkpoint to --workdir;
`gqlm.tokenize` then builds an N-id tokenizer from it (`data.tokenizer=gqvae:workdirs/gqvae_1k`).
One 4096-code model serves the 1k and 4k vocabularies (the most used codes' strings fill them).
Measured on the shared 2-core CPU (load ~10-20 from other jobs): 400 steps of 128 pieces, ~15 min
per model, far from the paper's budget; see
benchmarks/results/tokenizers.json for what the tokenizers reach.

Variants: `:vqvae` is the paper's VQ-VAE baseline (same model, a token end every 4 bytes);
`:smoke` is the same code path shrunk to seconds, for tests.
"""

import ml_collections

from gqlm.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.corpus = "shakespeare"
    q = config.gqvae
    q.embed_dim = 64
    q.num_heads = 4
    q.encoder_layers = 2
    q.gater_layers = 2
    q.mlp_dim = 256
    q.codebook_size = 4096
    q.batch_size = 128
    q.learning_rate = 1e-3
    # The paper's 500 warm-up steps / 250-step re-seeding, scaled to this short CPU budget.
    q.warmup_steps = 100
    q.reseed_every = 50
    config.train.steps = 400
    config.train.log_every = 50
    if arg == "vqvae":
        q.fixed_gate_every = 4
    elif arg == "smoke":
        q.embed_dim, q.num_heads, q.encoder_layers, q.gater_layers, q.mlp_dim = 16, 2, 1, 1, 32
        q.codebook_size, q.batch_size, q.warmup_steps, q.reseed_every = 64, 32, 5, 5
        config.train.steps = 20
        config.train.log_every = 10
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (known: vqvae, smoke)")
    return config
