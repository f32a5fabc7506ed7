"""gqlm's train step against a minimal hand-written JAX step of the same shape (framework overhead).

    PYTHONPATH=. .venv/bin/python benchmarks/minimal_step.py [--rounds 7] [--ablations]

The reference is what one would write by hand for `experiments/dense.py:d512` on the CPU mesh
(4 layers, D 512, 8 heads, SwiGLU F 2048, RoPE, tied byte embeddings, seq 512 x batch 16, fp32,
data parallel over the 8 fake devices with jax.jit + NamedSharding): the same parameters, a plain
causal mask, mean cross-entropy, `optax.adamw` at a constant learning rate, nothing else. gqlm's
step is the real one (`jit_train_step`) with all it carries: packed-document masking, bits per
byte, gradient clipping, the weight-decay mask, the warm-up/cosine schedule, the non-finite guard
and its metrics. Both run in one process on the same batches, interleaved: each round times
`--steps` steps of one, then of the other. The table shows medians over rounds; the ratio is the
median of the rounds' ratios (the 2 cores are shared, so load drifts between rounds).

`--ablations` then times, each against the minimal step in its own interleaved rounds, the minimal
step with one of gqlm's features added (the cost of that feature) or gqlm's step with a feature
configured otherwise; and the optimizer update alone (one device, the whole parameter tree):
AdamW as the minimal step runs it, gqlm's optimizer, and its non-finite guard as a `where` over
every leaf (gqlm before this benchmark) or as a `cond` (gqlm now). The 1-minute load average is
kept with every comparison: idle waits (a device blocked in a collective) cost wall time only when
the cores would otherwise be free, so the same code measures differently on a busy machine.
Writes benchmarks/results/minimal_step.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 fake CPU devices unless set

import functools  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm.models.positions import apply_rope  # noqa: E402
from gqlm.optim.factory import make_optimizer  # noqa: E402
from gqlm.train.step import apply_update, apply_update_if  # noqa: E402
from timing import TrainStepTimer, mesh_overrides, time_alternating, write_results  # noqa: E402

flags.DEFINE_integer("rounds", 7, "Interleaved rounds (each times both steps).")
flags.DEFINE_integer("ablation_rounds", 5, "Interleaved rounds of each ablation.")
flags.DEFINE_integer("steps", 1, "Steps of each case per round.")
flags.DEFINE_bool("ablations", False, "Also time the ablations (about 2 minutes each on an idle machine).")
flags.DEFINE_string("out", "benchmarks/results/minimal_step.json", "JSON output.")
FLAGS = flags.FLAGS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXPERIMENT = "experiments/dense.py:d512"
OVERRIDES = {"data.seq_len": "512", "data.batch_size": "16", "data.corpus": "shakespeare",
             **mesh_overrides((8, 1, 1))}
# name: (minimal-step features added, gqlm overrides); exactly one of the two is set.
ABLATIONS = {
    "minimal + loss over the global token count": (dict(token_count=True), None),
    "minimal + packed-document mask and positions": (dict(documents=True), None),
    "minimal + non-finite guard (where)": (dict(guard=True), None),
    "minimal + clip_by_global_norm(1)": (dict(clip=True), None),
    "gqlm, model.attention_impl=xla": (None, {"model.attention_impl": "xla"}),
}


MINIMAL_TX = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)


def init_params(key: jax.Array, V: int, D: int, L: int, H: int, F: int) -> dict[str, Any]:
    """Llama-shaped parameters: tied embedding [V, D]; per layer q/k/v [D, H, K], o [H, K, D],
    SwiGLU [D, F] x 2 and [F, D], two norm scales; a final norm."""
    K = D // H
    keys = iter(jax.random.split(key, 1 + 7 * L))
    normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    layers = [dict(attn_norm=jnp.ones(D), q=normal(D, H, K), k=normal(D, H, K), v=normal(D, H, K),
                   o=normal(H, K, D), mlp_norm=jnp.ones(D), gate=normal(D, F), up=normal(D, F),
                   down=normal(F, D)) for _ in range(L)]
    return dict(embed=normal(V, D), layers=layers, final_norm=jnp.ones(D))


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array) -> jax.Array:
    return x_BTD * jax.lax.rsqrt(jnp.mean(x_BTD * x_BTD, axis=-1, keepdims=True) + 1e-6) * scale_D


def forward(params: dict[str, Any], batch: dict[str, jax.Array], documents: bool = False) -> jax.Array:
    """Logits [B, T, V]: pre-norm blocks, RoPE, causal attention, SwiGLU. Positions 0..T-1 and a
    plain causal mask; with `documents`, the batch's positions and its segment ids' mask."""
    inputs_BT = batch["inputs"]
    T = inputs_BT.shape[1]
    mask_BTS = jnp.tril(jnp.ones((1, T, T), bool))
    positions_BT = jnp.broadcast_to(jnp.arange(T), inputs_BT.shape)
    if documents:
        positions_BT, segments_BT = batch["positions"], batch["segment_ids"]
        mask_BTS = mask_BTS & (segments_BT[:, :, None] == segments_BT[:, None, :])
    x_BTD = params["embed"][inputs_BT]
    for p in params["layers"]:
        h_BTD = rms_norm(x_BTD, p["attn_norm"])
        q_BTHK = apply_rope(jnp.einsum("btd,dhk->bthk", h_BTD, p["q"]), positions_BT, 10_000.0)
        k_BSHK = apply_rope(jnp.einsum("bsd,dhk->bshk", h_BTD, p["k"]), positions_BT, 10_000.0)
        v_BSHK = jnp.einsum("bsd,dhk->bshk", h_BTD, p["v"])
        logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK) * q_BTHK.shape[-1] ** -0.5
        probs_BHTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], logits_BHTS, -1e30), axis=-1)
        out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
        x_BTD = x_BTD + jnp.einsum("bthk,hkd->btd", out_BTHK, p["o"])
        h_BTD = rms_norm(x_BTD, p["mlp_norm"])
        gated_BTF = jax.nn.silu(h_BTD @ p["gate"]) * (h_BTD @ p["up"])
        x_BTD = x_BTD + gated_BTF @ p["down"]
    return rms_norm(x_BTD, params["final_norm"]) @ params["embed"].T


def make_minimal_step(tx: optax.GradientTransformation, token_count: bool = False, documents: bool = False,
                      guard: bool = False):
    """The hand-written step; each option adds one of gqlm's features: the loss averaged over the
    batch's loss-mask count (a global sum the backward pass needs), packed documents, and the
    non-finite guard as gqlm had it (a where over every parameter and optimizer-state leaf)."""
    def loss_fn(params, batch):
        ce_BT = optax.softmax_cross_entropy_with_integer_labels(forward(params, batch, documents), batch["targets"])
        if not token_count:
            return ce_BT.mean()
        return jnp.sum(ce_BT * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state[0], batch)
        new_state = apply_update(tx, grads, *state)
        if guard:
            new_state = keep_if(jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads)), new_state, state)
        return new_state, loss
    return step


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
    """The non-finite guard as gqlm had it: a where over every leaf of the new state."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class MinimalStepTimer:
    """The hand-written step on an 8-device data-parallel mesh of its own, reading the batches of
    gqlm's `TrainStepTimer`; `run(steps)` like `TrainStepTimer.run`."""

    def __init__(self, gqlm_timer: TrainStepTimer, clip: bool = False, **features: bool):
        cfg = gqlm_timer.exp.config.model
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        tx = optax.chain(optax.clip_by_global_norm(1.0), MINIMAL_TX) if clip else MINIMAL_TX

        def init(key):
            params = init_params(key, cfg.vocab_size, cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.mlp_dim)
            return params, tx.init(params)
        self.state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(0))
        self.step = jax.jit(make_minimal_step(tx, **features), in_shardings=(replicated, rows),
                            out_shardings=(replicated, None), donate_argnums=0)
        self.data = [jax.device_put(jax.device_get(batch), rows) for batch in gqlm_timer.data]
        self.param_count = sum(x.size for x in jax.tree.leaves(self.state[0]))
        self._next = 0

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, loss = self.step(self.state, self.data[self._next % len(self.data)])
            self._next += 1
            jax.block_until_ready(loss)
        return (time.perf_counter() - start) / steps


class CpuClock:
    """Wraps a timer: `run` as the timer's, also keeping this process's CPU seconds per step
    (all threads: it tells compute from waiting, as idle waits cost wall time but little CPU)."""

    def __init__(self, timer: Any):
        self.timer, self.cpu_s = timer, []

    def run(self, steps: int) -> float:
        start = time.process_time()
        seconds = self.timer.run(steps)
        self.cpu_s.append((time.process_time() - start) / steps)
        return seconds


def gqlm_timer(extra: dict[str, str] | None = None) -> TrainStepTimer:
    config = config_lib.load_experiment(os.path.join(ROOT, EXPERIMENT))
    return TrainStepTimer(config_lib.apply_override_strings(config, {**OVERRIDES, **(extra or {})}), 4)


def compare(reference: Any, case: Any, rounds: int, steps: int) -> dict[str, Any]:
    """Alternating rounds of two timers (after 2 warm-up steps each): medians, and the ratio
    case tokens/s over reference tokens/s (the median of the rounds' ratios)."""
    clocks = {"reference": CpuClock(reference), "case": CpuClock(case)}
    for clock in clocks.values():
        clock.timer.run(2)  # compilation, first-touch allocation
    load = os.getloadavg()[0]
    wall = time_alternating({k: functools.partial(c.run, steps) for k, c in clocks.items()}, rounds)
    ratios = [r / c for r, c in zip(wall["reference"], wall["case"])]
    return dict(ratio=statistics.median(ratios), ratio_per_round=ratios,
                step_s=[statistics.median(wall[k]) for k in clocks],
                cpu_s=[statistics.median(c.cpu_s) for c in clocks.values()], round_step_s=list(wall.values()),
                load_average_1min=[load, os.getloadavg()[0]])


def run_ablations(minimal: MinimalStepTimer, base: TrainStepTimer) -> list[dict[str, Any]]:
    rows = []
    for name, (features, overrides) in ABLATIONS.items():
        case = MinimalStepTimer(base, **features) if features is not None else gqlm_timer(overrides)
        row = dict(case=name, **compare(minimal, case, FLAGS.ablation_rounds, FLAGS.steps))
        print(f"{name:<48} {row['ratio']:>6.3f} {row['cpu_s'][1]:>6.2f} {row['cpu_s'][0]:>6.2f}", flush=True)
        rows.append(row)
        del case
        gc.collect()
    return rows


def time_optimizer_updates(base: TrainStepTimer, rounds: int = 9, updates: int = 5) -> dict[str, float]:
    """CPU seconds of one optimizer update over the whole parameter tree on one device (each
    data-parallel device runs it), for AdamW alone and gqlm's optimizer with each guard."""
    params = jax.device_put(jax.device_get(base.state.params), jax.devices()[0])
    grads = jax.tree.map(lambda p: 1e-3 * p + 1e-4, params)
    gqlm_tx = base.exp.tx

    def where_guard(grads, params, opt_state):
        finite = jnp.isfinite(optax.global_norm(grads))
        return keep_if(finite, apply_update(gqlm_tx, grads, params, opt_state), (params, opt_state))

    def cond_guard(grads, params, opt_state):
        return apply_update_if(jnp.isfinite(optax.global_norm(grads)), gqlm_tx, grads, params, opt_state)

    cases = {"optax.adamw (the minimal step's)": (MINIMAL_TX, functools.partial(apply_update, MINIMAL_TX)),
             "gqlm's optimizer (clip, masked AdamW, schedule)": (gqlm_tx, functools.partial(apply_update, gqlm_tx)),
             "gqlm's optimizer + guard as a where over every leaf": (gqlm_tx, where_guard),
             "gqlm's optimizer + guard as a cond": (gqlm_tx, cond_guard)}
    states, clocks = {}, {}
    for name, (tx, update) in cases.items():
        step = jax.jit(lambda state, grads, update=update: update(grads, *state), donate_argnums=0)
        states[name] = step((jax.tree.map(jnp.copy, params), tx.init(params)), grads)

        def clock(name=name, step=step):
            start = time.process_time()
            for _ in range(updates):
                states[name] = step(states[name], grads)
            jax.block_until_ready(states[name])
            return (time.process_time() - start) / updates
        clocks[name] = clock
    cpu = time_alternating(clocks, rounds)
    return {name: statistics.median(seconds) for name, seconds in cpu.items()}


def main(argv):
    del argv
    real = gqlm_timer()
    minimal = MinimalStepTimer(real)
    params = dict(minimal=int(minimal.param_count), gqlm=int(sum(x.size for x in jax.tree.leaves(real.state.params))))
    assert params["minimal"] == params["gqlm"], params
    result = compare(minimal, real, FLAGS.rounds, FLAGS.steps)
    tokens = real.tokens
    print(f"{'step':<10} {'s/step':>8} {'tokens/s':>9} {'CPU s/step':>11}   "
          f"(medians of {FLAGS.rounds} interleaved rounds)")
    for name, wall, cpu in zip(("minimal", "gqlm"), result["step_s"], result["cpu_s"]):
        print(f"{name:<10} {wall:>8.3f} {tokens / wall:>9.0f} {cpu:>11.2f}")
    print(f"gqlm / minimal tokens/s: {result['ratio']:.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in result['ratio_per_round'])})")
    results = dict(experiment=EXPERIMENT, overrides=OVERRIDES, tokens_per_step=tokens, params=params,
                   device_kind=jax.devices()[0].device_kind, devices=jax.device_count(),
                   jax_version=jax.__version__, rounds=FLAGS.rounds, steps_per_round=FLAGS.steps,
                   cases=["minimal", "gqlm"], tokens_per_s=[tokens / s for s in result["step_s"]], **result)
    if FLAGS.ablations:
        print(f"{'ablation (vs the minimal step, same rounds)':<48} {'ratio':>6} {'CPU s':>6} {'(min.)':>6}")
        results["ablations"] = run_ablations(minimal, real)
        del minimal
        gc.collect()
        results["optimizer_update_cpu_s"] = time_optimizer_updates(real)
        print("optimizer update alone, CPU s per update on one device:")
        for name, seconds in results["optimizer_update_cpu_s"].items():
            print(f"  {name:<56} {seconds:.4f}")
    write_results(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
