"""Model shapes shared by experiment files, so sizes are defined once (big_vision-style variants)."""

from gqlm.config import ConfigDict, base_config

# name: (embed_dim, num_layers, num_heads, num_kv_heads, mlp_dim, max_seq_len)
DENSE_SIZES = {
    "tiny": (128, 4, 4, 4, 512, 256),
    "d512": (512, 4, 8, 8, 2048, 512),
    "125m": (768, 12, 12, 12, 3072, 1024),  # GPT-2 small shape (SwiGLU mlp_dim kept at 4x)
    "350m": (1024, 24, 16, 16, 4096, 2048),
    "1b": (2048, 16, 16, 4, 8192, 4096),  # pod-scale: grouped-query attention, long context
}


def apply_dense(config: ConfigDict, size: str) -> ConfigDict:
    """Sets the model shape of a named size; raises ValueError naming the size if unknown."""
    if size not in DENSE_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(DENSE_SIZES)}")
    m = config.model
    m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim, m.max_seq_len = DENSE_SIZES[size]
    return config


def dense_experiment(size: str) -> ConfigDict:
    """The dense LM family (python_stdlib corpus, AdamW): one definition for every size."""
    config = apply_dense(base_config(), size)
    config.data.corpus = "python_stdlib"
    config.data.seq_len = min(1024, config.model.max_seq_len)
    config.data.batch_size = 256
    config.optimizer.learning_rate = 6e-4 if size in ("125m", "350m") else 3e-4
    config.optimizer.warmup_steps = 2000
    config.train.steps = 100_000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    if size == "1b":  # Pod scale: shard params and optimizer state, bf16 compute, remat.
        config.mesh.data, config.mesh.fsdp = 1, -1
        config.model.compute_dtype = "bfloat16"
        config.model.remat = "full"
        config.data.seq_len = 2048
        config.data.batch_size = 512
    return config


def tiny_cpu_experiment(variant: str = "") -> ConfigDict:
    """The demo: a byte-level d128 x 4 LM on Shakespeare, 8-way data parallel. `smoke`: seconds-long."""
    config = apply_dense(base_config(), "tiny")
    config.data.corpus = "shakespeare"
    config.data.tokenizer = "byte"
    config.data.seq_len = 128
    config.data.batch_size = 32
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 25
    config.train.steps = 250
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batches = 4
    config.train.checkpoint_every = 100
    config.mesh.data = 8
    if variant == "smoke":  # Same code path, seconds instead of minutes.
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
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: smoke)")
    return config
