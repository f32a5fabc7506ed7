"""MoE throughput: dense MLP vs MoE at matched active FLOPs, dropless vs capacity, expert axis 1/4/8.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/moe.py [--steps 5]

Two sections, each timed after warm-up on the same 8 (fake CPU) devices:
1. layer: forward + backward of one MLP layer on B x T tokens (jitted, params sharded by the
   rules table): the dense SwiGLU of width F, and 8 experts of width F/2 with top-2 routing (the
   same active FLOPs), for each dispatch/backend and mesh (data=8/G, expert=G).
2. train: a full train step (AdamW) of experiments/tiny_cpu.py vs experiments/moe_tiny_cpu.py.
Prints tables and writes benchmarks/results/moe.json. Numbers are only comparable within a run.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from gqlm import config as config_lib  # noqa: E402
from gqlm import mesh as mesh_lib  # noqa: E402
from gqlm.data.pipeline import make_train_iterator, to_global  # noqa: E402
from gqlm.models.layers import Mlp  # noqa: E402
from gqlm.models.moe import MoeMLP  # noqa: E402
from gqlm.train import state as state_lib  # noqa: E402
from gqlm.train.experiment import build_experiment  # noqa: E402
from gqlm.train.step import make_train_step  # noqa: E402

flags.DEFINE_integer("steps", 5, "Timed steps per case (after 2 warm-up steps).")
flags.DEFINE_integer("tokens", 8192, "Tokens per layer-benchmark batch (B x T, T = 256).")
flags.DEFINE_bool("train", True, "Also time full train steps of the tiny experiments.")
flags.DEFINE_string("out", "benchmarks/results/moe.json", "JSON output.")
FLAGS = flags.FLAGS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXPERTS = (1, 4, 8)
LAYER_CASES = [  # (name, moe overrides or None for the dense MLP)
    ("dense_mlp", None),
    ("moe_dropless_dense", dict(dispatch="dropless", backend="dense")),
    ("moe_dropless_ragged", dict(dispatch="dropless", backend="ragged")),
    ("moe_capacity_1.25", dict(dispatch="capacity", capacity_factor=1.25)),
]


def timed(fn, *args, steps: int) -> float:
    """Mean seconds per call after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / steps


def layer_config(moe: dict | None, expert: int) -> config_lib.ConfigDict:
    c = config_lib.base_config()
    c.model.embed_dim, c.model.mlp_dim = 256, 1024
    if moe is not None:
        e = c.model.moe
        e.num_experts, e.top_k, e.mlp_dim = 8, 2, 512
        e.update(moe)
    c.mesh.data, c.mesh.expert = 8 // expert, expert
    return c


def measure_layer(moe: dict | None, expert: int, steps: int) -> dict:
    config = layer_config(moe, expert)
    cfg = config.model
    module = MoeMLP(cfg, rngs=nnx.Rngs(0)) if moe is not None else Mlp(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    mesh = mesh_lib.make_mesh(config.mesh)
    seq = 256
    batch = FLAGS.tokens // seq

    def loss(params, x_BTD):
        layer = nnx.merge(graphdef, params)
        if moe is None:
            return jnp.mean(jnp.square(layer(x_BTD))), jnp.zeros(())
        y_BTD, aux = layer(x_BTD, jnp.ones(x_BTD.shape[:2], jnp.int32))
        return jnp.mean(jnp.square(y_BTD)) + 0.01 * aux["lb_loss"], aux["drop_fraction"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    with jax.set_mesh(mesh):
        params = jax.device_put(nnx.to_pure_dict(state),
                                mesh_lib.param_shardings(state, config.mesh.rules, mesh))
        x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, seq, cfg.embed_dim)),
                           mesh_lib.batch_sharding(mesh, config.mesh.rules))
        seconds = timed(step, params, x, steps=steps)
        (_, drop), _ = step(params, x)
    return {"step_time_s": seconds, "tokens_per_s": FLAGS.tokens / seconds,
            "drop_fraction": float(drop)}


def measure_training(experiment: str, overrides: dict[str, str], steps: int) -> dict:
    config = config_lib.load_experiment(os.path.join(ROOT, experiment))
    config = config_lib.apply_overrides(config, {**overrides, "optimizer.warmup_steps": "1"})
    exp = build_experiment(config)
    cfg = exp.config
    batches = make_train_iterator(cfg, exp.tokenizer)
    sharding = mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
    with jax.set_mesh(exp.mesh):
        state = state_lib.init_state(cfg.model, exp.tx, 0, exp.shardings)
        step = jax.jit(make_train_step(exp.model.graphdef, exp.tx, exp.schedule, cfg, exp.token_bytes),
                       in_shardings=(exp.shardings, sharding), out_shardings=(exp.shardings, None),
                       donate_argnums=0)
        data = [to_global(next(batches), sharding) for _ in range(steps + 2)]
        for batch in data[:2]:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in data[2:]:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {"step_time_s": seconds, "tokens_per_s": tokens / seconds}


def main(argv):
    del argv
    results = {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
               "layer_tokens": FLAGS.tokens, "layer": [], "train": []}
    print(f"layer fwd+bwd, {FLAGS.tokens} tokens, D=256: dense F=1024 vs 8 experts F=512 top-2")
    print(f"{'case':<22} {'expert':>6} {'step ms':>9} {'tok/s':>9} {'dropped':>8}")
    for name, moe in LAYER_CASES:
        for expert in EXPERTS:
            row = measure_layer(moe, expert, FLAGS.steps)
            row.update(case=name, expert=expert)
            results["layer"].append(row)
            print(f"{name:<22} {expert:>6} {row['step_time_s'] * 1e3:>9.1f} {row['tokens_per_s']:>9.0f} "
                  f"{row['drop_fraction']:>8.3f}")
    if FLAGS.train:
        print("\ntrain step (AdamW), tiny_cpu vs moe_tiny_cpu (4 layers, d128, 4096 tokens/step)")
        print(f"{'case':<22} {'expert':>6} {'step ms':>9} {'tok/s':>9}")
        cases = [("dense", "experiments/tiny_cpu.py", {"mesh.data": "8"}, 1)]
        for dispatch in ("dropless", "capacity"):
            for expert in EXPERTS:
                cases.append((f"moe_{dispatch}", "experiments/moe_tiny_cpu.py",
                              {"model.moe.dispatch": dispatch, "mesh.data": str(8 // expert),
                               "mesh.expert": str(expert)}, expert))
        for name, experiment, overrides, expert in cases:
            row = measure_training(experiment, overrides, FLAGS.steps)
            row.update(case=name, expert=expert)
            results["train"].append(row)
            print(f"{name:<22} {expert:>6} {row['step_time_s'] * 1e3:>9.1f} {row['tokens_per_s']:>9.0f}")
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
