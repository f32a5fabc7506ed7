"""KV-cache generation vs the window-recompute sampler it replaced, on the tiny_cpu model shape.

    PYTHONPATH=. python benchmarks/generate.py [--num_tokens 512] [--repeats 3] [--windows 128,512]

The model is `experiments/tiny_cpu.py`'s (d128 x 4 layers, 4 heads, byte vocabulary padded to
384), randomly initialised: speed does not depend on the weights. Its context (data.seq_len) is
set to each of --windows in turn: 128 as the demo trains it, 512 as a run at seq 512 would. Both
paths decode greedily from the same 16-token prompt on one device:
- `window`: what `train/sampling.py` did before the cache: every new token re-runs the model
  over the last min(seq_len, max_seq_len) tokens (one jitted fori_loop; copied below).
- `cache`: `gqlm.models.decode.generate`: one prefill, then one token per step against the cache,
  for one row and for a batch of 8 prompts of different lengths.
Times exclude compilation (one warm-up call each) and are the best of --repeats. The ratio
window / cache (one row) is measured in the same run, per context length; the target is >= 10x.
The window path's cost grows with the context, the cache step's barely: at 128 slots a cache
step is bound by XLA:CPU's fixed per-op cost. Until the window
starts to slide both paths compute the same greedy tokens, which the table checks.
Prints a markdown table and writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from gqlm.models.decode import generate, next_token
from gqlm.models.transformer import Transformer
from gqlm.presets import tiny_cpu_experiment
from timing import write_results

flags.DEFINE_integer("num_tokens", 512, "New tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed calls per case (the best counts).")
flags.DEFINE_list("windows", ["128", "512"], "Context lengths (data.seq_len) to measure.")
flags.DEFINE_string("out", "benchmarks/results/generate.json", "JSON output.")
FLAGS = flags.FLAGS

TARGET_RATIO = 10.0
PROMPT_LEN, BATCH = 16, 8


@partial(jax.jit, static_argnames=("graphdef", "num_tokens", "window"))
def window_generate(graphdef: nnx.GraphDef, params: Any, prompt_P: jax.Array, *, num_tokens: int,
                    window: int) -> jax.Array:
    """The old sampler, greedy: each new token re-runs the model over the last `window` tokens."""
    model = nnx.merge(graphdef, params)
    prompt_len = prompt_P.shape[0]
    # `window` pad slots on each side keep the sliding window inside the buffer (no index clamping).
    buffer_N = jnp.zeros((2 * window + prompt_len + num_tokens,), jnp.int32).at[window:window + prompt_len].set(prompt_P)
    positions_1T = jnp.arange(window, dtype=jnp.int32)[None]

    def body(i, buffer_N):
        end = window + prompt_len + i  # index of the token being produced
        start = jnp.maximum(end - window, window)  # first real token in the window
        tokens_1T = jax.lax.dynamic_slice(buffer_N, (start,), (window,))[None]
        logits_1TV, _ = model(tokens_1T, positions_1T, jnp.ones_like(tokens_1T))
        logits_1V = jax.lax.dynamic_index_in_dim(logits_1TV, end - start - 1, axis=1, keepdims=False)
        return buffer_N.at[end].set(next_token(logits_1V, None, 0.0, 0)[0].astype(jnp.int32))

    buffer_N = jax.lax.fori_loop(0, num_tokens, body, buffer_N)
    return buffer_N[window + prompt_len:window + prompt_len + num_tokens]


def best_seconds(fn: Callable[[], jax.Array], repeats: int) -> tuple[float, np.ndarray]:
    """(best wall seconds of `repeats` calls after one warm-up call, the last result)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), np.asarray(out)


def run_cases(graphdef: nnx.GraphDef, params: Any, window: int) -> tuple[list[dict], int]:
    """Rows of the table, and how many leading tokens the two one-row paths share."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=PROMPT_LEN - 2 * b).tolist() for b in range(BATCH)]
    n, key = FLAGS.num_tokens, jax.random.key(0)
    cases = {
        "window": (1, lambda: window_generate(graphdef, params, jnp.asarray(prompts[0], jnp.int32),
                                              num_tokens=n, window=window)),
        "cache": (1, lambda: generate(graphdef, params, prompts[:1], key, num_tokens=n)),
        "cache_batch8": (BATCH, lambda: generate(graphdef, params, prompts, key, num_tokens=n)),
    }
    rows, outs = [], {}
    for name, (batch, fn) in cases.items():
        seconds, outs[name] = best_seconds(fn, FLAGS.repeats)
        rows.append(dict(case=name, window=window, batch=batch, prompt_len=PROMPT_LEN, new_tokens=n, seconds=seconds,
                         ms_per_step=1e3 * seconds / n, tokens_per_s=batch * n / seconds))
    window_row = outs["window"].reshape(-1)
    cache_row = outs["cache"].reshape(-1)
    shared = int(np.argmin(np.append(window_row == cache_row, False)))
    return rows, shared


def main(argv):
    del argv
    rows, speedups, shared_tokens = [], {}, {}
    for window in (int(w) for w in FLAGS.windows):
        cfg = tiny_cpu_experiment().copy_and_resolve_references()
        cfg.model.vocab_size = 384  # the byte tokenizer's 259 ids, rounded up to 128 as training does
        cfg.data.seq_len, cfg.model.max_seq_len = window, max(window, cfg.model.max_seq_len)
        graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
        window_rows, shared_tokens[window] = run_cases(graphdef, params, window)
        by_case = {r["case"]: r for r in window_rows}
        speedups[window] = by_case["window"]["seconds"] / by_case["cache"]["seconds"]
        rows += window_rows
    print("| context | case | batch | new tokens | seconds | ms / step | tokens/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['window']} | {r['case']} | {r['batch']} | {r['new_tokens']} | {r['seconds']:.3f} "
              f"| {r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} |")
    for window, ratio in speedups.items():
        print(f"context {window}: cache speed-up over window recompute (one row) {ratio:.1f}x "
              f"(target >= {TARGET_RATIO:.0f}x); greedy tokens equal before the window slides: "
              f"{shared_tokens[window]} (expected >= {window - PROMPT_LEN})")
    device = jax.devices()[0]
    write_results(FLAGS.out, dict(
        date=time.strftime("%Y-%m-%d"), jax_version=jax.__version__, device=device.device_kind,
        platform=device.platform, model=dict(embed_dim=cfg.model.embed_dim, num_layers=cfg.model.num_layers,
                                             num_heads=cfg.model.num_heads, vocab_size=cfg.model.vocab_size),
        rows=rows, speedup_by_window={str(w): r for w, r in speedups.items()}, target_ratio=TARGET_RATIO,
        shared_greedy_tokens_by_window={str(w): n for w, n in shared_tokens.items()}))


if __name__ == "__main__":
    app.run(main)
