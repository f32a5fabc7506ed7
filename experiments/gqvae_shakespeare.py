"""GQ-VAE tokenizer model on Shakespeare (byte-level, learned variable-length tokens).

    python -m gqlm.train --config experiments/gqvae_shakespeare.py:cpu --workdir workdirs/gqvae_cpu   # the CPU recipe
    python -m gqlm.train --config experiments/gqvae_shakespeare.py --workdir workdirs/gqvae
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:vqvae --workdir workdirs/vqvae
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:robust --workdir workdirs/gqvae_robust
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:paper,codebook=16384 --workdir DIR   # on a GPU
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:v8k --workdir workdirs/gqvae_8k --stop_at_step 800
    python -m gqlm.train --config experiments/gqvae_shakespeare.py:v8k,codebook=4096 --workdir workdirs/gqvae_8k_c4k \
      --stop_at_step 800
    python -m gqlm.tokenize --kind gqvae --checkpoint workdirs/gqvae --vocab_size 1024 --out workdirs/gqvae_1k

The runner trains the GQ-VAE (`gqvae.train_tokenizer=True`) for `train.steps` steps on the train
split: orbax checkpoints in --workdir/checkpoints (re-running resumes), metrics in
--workdir/metrics.jsonl and tensorboard (byte_accuracy, mean_gate, mean_token_len, codes_in_use,
codebook_usage, codebook_perplexity). `gqlm.tokenize` then builds an N-id tokenizer from the
checkpoint (`data.tokenizer=gqvae:workdirs/gqvae_1k`). `config.optimizer` is not read: the GQ-VAE
has its own Adam (`gqvae.learning_rate`, codebook x `gqvae.codebook_lr_multiplier`).

Variants (combinable with commas, e.g. `:v8k,codebook=4096`):
- `:cpu`: the CPU recipe: the 400-step schedule below with `:robust`'s bounded gate and its
  token-rate term at 3.5 bytes; 2-14 min on the shared 2-core CPU. Its 4k tokenizer beats the
  VQ-VAE's LM bits per byte and is within 5% of BPE's, and 3 seeds do not collapse
  (docs/gqvae.md, "The CPU recipe"). Not the paper's objective.
- (none): a 4096-code model, 400 steps of 128 pieces; ~15 min on the shared 2-core CPU, far from
  the paper's budget. Its segmentation of the train split has 7,040 distinct multi-byte segments
  (the vocabulary's candidates): 1k and 4k vocabularies build, 8k does not.
- `:vqvae`: the paper's VQ-VAE baseline (same model, a token end every 4 bytes). Its tokenizer's
  segments are the pretokens' 4-byte chunks, so its vocabulary does not depend on the training.
- `:v8k`: a 16384-code book re-seeded every 25 steps from a buffer of recent encoder outputs, 2000
  steps of 256 pieces (1-6 s/step on the shared CPU; the comparison stopped it at 800 with
  `--stop_at_step 800`). Its segmentation of the train split has ~56k distinct multi-byte
  segments, so 8k builds (one string per code gave only 5,610). But the reason is a collapsed gate:
  at 800 steps (and `:v8k,codebook=4096` at 409) no token ends where the gate alone decides, only
  where it is forced (pretoken piece ends, every `max_token_len` bytes), so the vocabulary is the
  most frequent pretokens (cut at 10 bytes); both models give the same vocabularies and encodings.
  With 16384 codes encoding is ~3x slower than with 4096 (the nearest-code search dominates).
  Why the gate collapses: it is bistable and picks a side in the first ~10-20 steps, before the
  decoder gives reconstruction any stake in where tokens end; the 3 x mean(g) pressure then drives
  the inner gate logits to about -20 (sigmoid' ~ 1e-9, below Adam's epsilon: the gater is frozen).
  Short CPU runs of `:v8k` (16,384 codes) to step 120-200: gate weight 3 (also with
  `--config.gqvae.warmup_steps=0`) and 2 collapse to whole pieces (mean gate 0.26 = the forced
  ends; at 2, ~1% of inner positions cut by step 200); weight 1 collapses the other way, to
  1.2-byte tokens (mean gate 0.84, byte accuracy 1.0), and stays there after quantization starts.
  The 4,096-code 400-step model escaped only after quantization began (few codes in use made
  whole pieces costly to reconstruct); with `:v8k`'s re-seeding every 25 steps thousands of codes
  are in use by step 200, so whole pieces stay cheap. No gate weight alone is a robust setting.
- `:paper`: the paper's schedule (500 warm-up steps, dead codes re-seeded every 250 steps) at
  batch 256 for 15,000 steps: a GPU job (~130 steps/s on one H100, vs 1-6 s/step here). On an
  H100 (`benchmarks/gpu_session.sh`, 95 s each, stopped by SIGTERM at 12-16k steps) neither
  codebook size collapsed: `:paper` (4,096 codes, step 12,363) cuts 2.90-byte tokens (mean gate
  0.35, byte accuracy 0.944, 1,312 codes in use), `:paper,codebook=16384` (step 14,570) 3.19-byte
  tokens (mean gate 0.31, byte accuracy 0.933, 1,928 codes in use; its segmentation fills an 8k
  vocabulary). The re-seeding period, not the codebook size, separates these from `:v8k`; with
  `gate=1` the same schedule collapsed to 1.19-byte tokens instead.
- `codebook=N`: another codebook size, e.g. `:v8k,codebook=4096`.
- `gate=W`: another `gqvae.gate_loss_weight` (the paper's 3), e.g. `:v8k,gate=2`.
- `:robust`: the bounded gate (`gqvae.gate=bounded`, whose gradient cannot vanish) and a token-rate
  term holding the mean token length near 3 bytes (`gqvae.gate_target_len=3`); not the paper's
  objective. Combinable with the schedules (`:v8k,robust`, `:paper,robust`). Why, with the
  measurements (benchmarks/results/gqvae_robustness.json): docs/gqvae.md, "Collapse".
- `target=L`: the token-rate term at L bytes (`gqvae.gate_target_len`; 0 = off, the paper's).
- `:smoke`: the same code path shrunk to seconds, for tests.
"""

import ml_collections

from gqlm.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.corpus = "shakespeare"
    q = config.gqvae
    q.train_tokenizer = True
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
    t = config.train
    t.update(dict(steps=400, log_every=50, eval_every=200, eval_batches=8, checkpoint_every=200, sample_tokens=0))
    for part in filter(None, arg.split(",")):
        if part == "vqvae":
            q.fixed_gate_every = 4
        elif part == "v8k":
            q.codebook_size = 16384
            q.batch_size = 256
            q.reseed_every = 25
            t.steps = 2000
            t.eval_every = t.checkpoint_every = 200
        elif part == "paper":
            q.batch_size, q.warmup_steps, q.reseed_every = 256, 500, 250
            t.steps = 15_000
            t.log_every, t.eval_every, t.checkpoint_every = 100, 1000, 1000
        elif part.startswith("codebook="):
            q.codebook_size = int(part[len("codebook="):])
        elif part.startswith("gate="):
            q.gate_loss_weight = float(part[len("gate="):])
        elif part == "robust":
            q.gate, q.gate_target_len = "bounded", 3.0
        elif part == "cpu":
            q.gate, q.gate_target_len = "bounded", 3.5
        elif part.startswith("target="):
            q.gate_target_len = float(part[len("target="):])
        elif part == "smoke":
            q.embed_dim, q.num_heads, q.encoder_layers, q.gater_layers, q.mlp_dim = 16, 2, 1, 1, 32
            q.codebook_size, q.batch_size, q.warmup_steps, q.reseed_every = 64, 32, 5, 5
            t.steps, t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 20, 10, 10, 2, 10
            t.progress = False
        else:
            raise ValueError(f"unknown variant {part!r} in {arg!r} (known, combinable with commas: cpu, vqvae, "
                             "v8k, paper, codebook=N, gate=W, robust, target=L, smoke)")
    return config
