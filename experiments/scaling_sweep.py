"""A scaling sweep: model sizes x token budgets, byte-level on Shakespeare, for L(N, D) fits.

    python -m gqlm.eval.scaling --sweep experiments/scaling_sweep.py --root /tmp/sweep --print_commands
    python -m gqlm.eval.scaling --sweep experiments/scaling_sweep.py --root /tmp/sweep --run
    python -m gqlm.eval.scaling --sweep experiments/scaling_sweep.py --root /tmp/sweep --budgets 1e13,1e14

`sweep()` lists the 16 runs (`get_config("w64,524288")`: width w64, 2^19 training tokens); each
trains from scratch with a cosine schedule ending at its token budget and evaluates once, at the
end. The fit reads each run's final validation loss. On 2 CPU cores the whole sweep takes ~1-2 h
(the largest run ~15 min); on an accelerator, scale WIDTHS and TOKENS up.
"""

from gqlm.config import base_config

# name: (embed_dim, num_layers); heads of 32 dims, SwiGLU mlp_dim 4x.
WIDTHS = {"w32": (32, 2), "w64": (64, 2), "w96": (96, 3), "w128": (128, 4)}
TOKENS = (2**18, 2**19, 2**20, 2**21)
BATCH, SEQ = 16, 128


def sweep() -> list[str]:
    return [f"{w},{t}" for w in WIDTHS for t in TOKENS]


def get_config(arg: str = "w64,524288"):
    width, _, tokens = arg.partition(",")
    if width not in WIDTHS or not tokens.isdigit():
        raise ValueError(f"expected 'WIDTH,TOKENS' with WIDTH in {', '.join(WIDTHS)}, got {arg!r}")
    config = base_config()
    m, d, t = config.model, config.data, config.train
    m.embed_dim, m.num_layers = WIDTHS[width]
    m.num_heads, m.num_kv_heads, m.mlp_dim, m.max_seq_len = m.embed_dim // 32, 0, 4 * m.embed_dim, SEQ
    d.corpus, d.tokenizer, d.seq_len, d.batch_size = "shakespeare", "byte", SEQ, BATCH
    t.steps = max(1, int(tokens) // (BATCH * SEQ))
    t.eval_every = t.checkpoint_every = t.steps
    t.eval_batches, t.log_every, t.sample_tokens = 16, 20, 0
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = min(100, t.steps // 10)
    config.mesh.data = 8
    return config
