"""The demo: a small byte-level LM on the complete works of Shakespeare, on an 8-device CPU mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m gqlm.train --config experiments/tiny_cpu.py --workdir /tmp/gqlm_tiny

Expect on 2 CPU cores: ~2-3 minutes, validation bits per byte falling from ~8 to ~2.5 (the
corpus' unigram entropy is ~4.6 bits per byte), and a (Shakespeare-flavoured) sample at the end.
`get_config("smoke")` is the same experiment shrunk for tests.
"""

from gqlm.config import base_config
from gqlm.presets import apply_dense


def get_config(arg: str = "") -> "ml_collections.ConfigDict":
    config = base_config()
    apply_dense(config, "tiny")
    config.data.corpus = "shakespeare"
    config.data.tokenizer = "byte"
    config.data.seq_len = 128
    config.data.batch_size = 32
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 30
    config.train.steps = 300
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 4
    config.train.checkpoint_every = 100
    config.mesh.data = 8
    if arg == "smoke":  # Same code path, seconds instead of minutes.
        config.model.num_layers = 2
        config.model.embed_dim = 64
        config.model.mlp_dim = 128
        config.data.seq_len = 32
        config.data.batch_size = 16
        config.train.steps = 20
        config.optimizer.warmup_steps = 2
        config.train.eval_every = 10
        config.train.checkpoint_every = 10
        config.train.eval_batches = 2
        config.train.sample_tokens = 16
        config.train.progress = False
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (known: smoke)")
    return config
