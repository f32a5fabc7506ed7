"""MoE in the model and the train step: router jitter, rules plumbing, logged metrics, 8x125m config."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm import config as config_lib
from gqlm import mesh as mesh_lib
from gqlm.data.pipeline import make_train_iterator, to_global
from gqlm.models.flops import count_params
from gqlm.models.moe import MoeMLP
from gqlm.models.transformer import Transformer
from gqlm.presets import dense_experiment
from gqlm.train import state as state_lib
from gqlm.train.experiment import build_experiment, jit_train_step
from gqlm.train.metrics import MetricWriter
from gqlm.train.tasks.lm import LMTask

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
B, T, D, F, E, K = 2, 6, 8, 16, 4, 2
JITTER = 0.5


def model_cfg(jitter=JITTER, num_layers=2, **model):
    c = config_lib.base_config().model
    c.embed_dim, c.mlp_dim, c.init_std, c.num_layers, c.num_heads = D, F, 0.3, num_layers, 2
    c.vocab_size, c.max_seq_len = 32, T
    c.moe.num_experts, c.moe.top_k, c.moe.router_jitter, c.moe.backend = E, K, jitter, "dense"
    c.update(model)
    return c


def numpy_layer(p, x, key, jitter):
    """Per-token reference: route on jittered inputs, run the experts on the clean ones."""
    x, noise = np.asarray(x, np.float64), np.asarray(
        jax.random.uniform(key, x.shape, jnp.float32, 1 - jitter, 1 + jitter), np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in p.items()}
    logits = (x * noise) @ w["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y, chosen_all = np.zeros_like(x), np.argsort(-probs, -1, kind="stable")[..., :K]
    for b in range(B):
        for t in range(T):
            chosen = chosen_all[b, t]
            for e in chosen:
                h = (x[b, t] @ w["wi_gate"][e]) * (x[b, t] @ w["wi_up"][e])
                h = h / (1 + np.exp(-(x[b, t] @ w["wi_gate"][e])))
                y[b, t] += probs[b, t, e] / probs[b, t, chosen].sum() * (h @ w["wo"][e])
    return y, chosen_all


def test_layer_jitter_needs_a_key_and_positive_jitter():
    graphdef, state = nnx.split(MoeMLP(model_cfg(), rngs=nnx.Rngs(0)))
    p = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    seg = jnp.ones((B, T), jnp.int32)
    key = jax.random.key(7)
    apply = jax.jit(lambda gd, *args: nnx.merge(gd, p)(x, seg, *args)[0], static_argnums=0)
    plain = apply(nnx.split(MoeMLP(model_cfg(jitter=0.0), rngs=nnx.Rngs(0)))[0], key)
    no_key, jittered = apply(graphdef), apply(graphdef, key)
    np.testing.assert_array_equal(np.asarray(no_key), np.asarray(plain))  # jitter=0: the key is ignored
    ref_plain, chosen_plain = numpy_layer(p, x, key, 0.0)
    ref_jit, chosen_jit = numpy_layer(p, x, key, JITTER)
    assert np.any(chosen_jit != chosen_plain)  # the noise really changes some routing decisions
    np.testing.assert_allclose(np.asarray(plain), ref_plain, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jittered), ref_jit, rtol=1e-4, atol=1e-5)


def forward(cfg, params=None, **kw):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state) if params is None else params
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, 32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    run = jax.jit(lambda p, kw: nnx.merge(graphdef, p)(ids, pos, jnp.ones((B, T), jnp.int32), **kw))
    logits, aux = run(params, kw)
    return logits, aux, params


def test_transformer_jitter_key_reaches_every_layer_scan_or_not():
    key = jax.random.key(3)
    plain, _, params = forward(model_cfg())
    same, _, _ = forward(model_cfg(), params)
    jit_a, aux_a, _ = forward(model_cfg(), params, jitter_key=key)
    jit_b, _, _ = forward(model_cfg(), params, jitter_key=key)
    other, _, _ = forward(model_cfg(), params, jitter_key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    np.testing.assert_array_equal(np.asarray(jit_a), np.asarray(jit_b))  # deterministic given the key
    assert not np.allclose(jit_a, plain) and not np.allclose(jit_a, other)
    # Scanned layers get the same per-layer keys as unrolled ones.
    stacked = dict(params, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *params["blocks"].values()))
    scanned, aux_s, _ = forward(model_cfg(scan_layers=True), stacked, jitter_key=key)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(jit_a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux_s["layer_1/load"]), np.asarray(aux_a["layer_1/load"]))
    rematted, _, _ = forward(model_cfg(remat="full"), params, jitter_key=key)
    np.testing.assert_allclose(np.asarray(rematted), np.asarray(jit_a), rtol=1e-5, atol=1e-6)


def test_rules_reach_the_moe_layer():
    """With batch -> data (default), the layer runs per device in shard_map; with batch -> nothing
    (a user's rules table), it must run on the global arrays. Same numbers either way."""
    cfg = model_cfg(jitter=0.0)
    mesh = mesh_lib.make_mesh(config_lib.base_config().mesh)  # data=8
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    ids = jnp.zeros((8, T), jnp.int32).at[:, 1::2].set(5)
    pos = jnp.broadcast_to(jnp.arange(T), (8, T))
    seg = jnp.ones((8, T), jnp.int32)
    no_batch_rules = tuple((name, None if name == "batch" else axes) for name, axes in config_lib.DEFAULT_RULES)

    def run(rules):
        fn = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, pos, seg, rules=rules)[0])
        with jax.set_mesh(mesh):
            return fn(params), str(jax.make_jaxpr(fn)(params))

    default_out, default_jaxpr = run(None)
    custom_out, custom_jaxpr = run(no_batch_rules)
    assert "shard_map" in default_jaxpr and "shard_map" not in custom_jaxpr
    np.testing.assert_allclose(np.asarray(custom_out), np.asarray(default_out), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- train step


def moe_smoke(**overrides):
    config = config_lib.load_experiment(os.path.join(EXPERIMENTS, "moe_tiny_cpu.py") + ":smoke")
    return config_lib.apply_overrides(config, dict(overrides))


def first_steps(config, num_steps=2, repeats=1):
    """Metrics of `num_steps` steps from the seed's init, `repeats` times with one jitted step."""
    exp = build_experiment(config, LMTask())
    batches = make_train_iterator(exp.config, exp.tokenizer)
    sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    runs = []
    with jax.set_mesh(exp.mesh):
        data = [to_global(next(batches), sharding) for _ in range(num_steps)]
        step = jit_train_step(exp, donate=False)
        for _ in range(repeats):
            state = state_lib.init_state(exp.config.model, exp.tx, exp.config.seed, exp.shardings)
            history = []
            for batch in data:
                state, metrics = step(state, batch)
                history.append(jax.device_get(metrics))
            runs.append(history)
    return runs


def test_train_step_with_jitter_is_deterministic_and_logs_moe_metrics(tmp_path):
    jittered = first_steps(moe_smoke(**{"model.moe.router_jitter": 0.2}), repeats=2)
    plain = first_steps(moe_smoke())[0]
    for a, b in zip(*jittered):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(float(j["loss"]) != float(p["loss"]) for j, p in zip(jittered[0], plain))

    metrics = plain[-1]
    assert all(np.ndim(v) == 0 for v in metrics.values())  # every metric reaches the writer
    assert "load" not in metrics
    num_layers = 2
    for i in range(num_layers):
        load = np.array([metrics[f"layer_{i}/load/e{e}"] for e in range(8)])
        assert load.sum() == pytest.approx(1.0, rel=1e-5) and np.all(load >= 0)
        assert float(metrics[f"layer_{i}/max_load"]) == pytest.approx(8 * load.max(), rel=1e-5)
        for key in ("lb_loss", "z_loss", "router_entropy", "drop_fraction"):
            assert f"layer_{i}/{key}" in metrics
        assert 0 < float(metrics[f"layer_{i}/router_entropy"]) <= np.log(8) + 1e-5
    for key, reduce in (("lb_loss", sum), ("z_loss", sum), ("router_entropy", np.mean), ("drop_fraction", np.mean),
                        ("max_load", np.mean)):  # losses add up over layers; rates are averaged
        per_layer = [float(metrics[f"layer_{i}/{key}"]) for i in range(num_layers)]
        assert float(metrics[key]) == pytest.approx(reduce(per_layer), rel=1e-5, abs=1e-7), key
    mean_load = [float(metrics[f"load/e{e}"]) for e in range(8)]
    assert sum(mean_load) == pytest.approx(1.0, rel=1e-5)

    writer = MetricWriter(str(tmp_path))
    writer.write(2, metrics)
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        logged = json.loads(f.readline())
    assert logged["layer_1/load/e7"] == pytest.approx(float(metrics["layer_1/load/e7"]))
    assert logged["layer_0/drop_fraction"] == pytest.approx(float(metrics["layer_0/drop_fraction"]))


# ----------------------------------------------------------------------------- 8x125m


def test_moe_8x125m_matches_dense_125m_active_params_and_validates_on_a_pod():
    config = config_lib.load_experiment(os.path.join(EXPERIMENTS, "moe_8x125m.py"))
    config_lib.validate(config, 256)
    config_lib.validate(config_lib.apply_override_strings(config, {"mesh.data": "1", "mesh.expert": "8"}), 8)
    dense = dense_experiment("125m")
    for c in (config, dense):
        c.model.vocab_size = 384  # resolved from the tokenizer at run time; irrelevant to the counts
    assert config_lib.moe_layer_indices(config.model) == tuple(range(12))
    moe_counts, dense_counts = count_params(config.model), count_params(dense.model)
    assert moe_counts["active_non_embedding"] == pytest.approx(dense_counts["active_non_embedding"], rel=0.05)
    assert moe_counts["non_embedding"] > 3 * dense_counts["non_embedding"]  # 8 experts of half width
