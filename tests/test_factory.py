"""make_optimizer: schedules, clipping, the weight-decay mask, parameter groups, bad input, and
optimizer-state shardings derived from the parameters'."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gqlm.config import MESH_AXES, ConfigError, base_config
from gqlm.optim import factory, soap as soap_lib


def _cfg(**kw):
    o = base_config().optimizer
    o.update(dict(schedule="constant", warmup_steps=0, grad_clip=0.0, weight_decay=0.0))
    o.update(kw)
    return o


def _params():
    rng = np.random.default_rng(0)
    shapes = {"blocks": {"0": {"attn": {"q": {"kernel": (8, 8)}}, "mlp": {"kernel": (8, 8)},
                               "norm": {"scale": (8,)}}},
              "embed": {"embedding": (10, 8)}, "unembed": {"kernel": (8, 10), "bias": (10,)},
              "final_norm": {"scale": (8,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("schedule,points", [
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)), 110: 0.1, 200: 0.1}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 35: 1.0 - 0.9 * 0.25, 110: 0.1}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
])
def test_schedule_values(schedule, points):
    _, sched = factory.make_optimizer(_cfg(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1,
                                           schedule=schedule), 110, _params())
    for step, want in points.items():
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-7), step


def test_global_norm_clipping():
    tx, _ = factory.make_optimizer(_cfg(name="sgd", b1=0.0, learning_rate=0.5, grad_clip=1.0), 10,
                                   {"w": jnp.zeros((2, 2))})
    big, small = jnp.full((2, 2), 2.5), jnp.full((2, 2), 0.25)  # global norms 5 and 0.5
    u, _ = tx.update({"w": big}, tx.init({"w": jnp.zeros((2, 2))}), {"w": jnp.zeros((2, 2))})
    np.testing.assert_allclose(u["w"], -0.5 * big / 5.0, rtol=1e-6)
    u, _ = tx.update({"w": small}, tx.init({"w": jnp.zeros((2, 2))}), {"w": jnp.zeros((2, 2))})
    np.testing.assert_allclose(u["w"], -0.5 * small, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "soap", "lion", "adalayer"])
def test_weight_decay_only_on_matrices(name):
    params = _params()
    lr, wd = 0.1, 0.2
    tx, _ = factory.make_optimizer(_cfg(name=name, learning_rate=lr, weight_decay=wd), 10, params)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    calls = 2 if name == "soap" else 1  # SOAP's first call only builds its statistics
    new = params
    for _ in range(calls):
        u, state = tx.update(zeros, state, new)
        new = optax.apply_updates(new, u)
    for (path, p), q in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new)):
        factor = (1 - lr * wd) if p.ndim >= 2 else 1.0
        np.testing.assert_allclose(q, p * factor, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_groups_soap_on_hidden_matrices_adamw_elsewhere():
    params = _params()
    groups = ({"name": "hidden", "pattern": r"^blocks/.*/kernel$", "optimizer": "soap", "lr_multiplier": 2.0},
              {"name": "head", "pattern": r"^unembed/", "optimizer": "adamw", "lr_multiplier": 0.5})
    o = _cfg(name="adamw", learning_rate=0.01, weight_decay=0.1, precondition_frequency=2, groups=groups)
    tx, _ = factory.make_optimizer(o, 10, params)
    hidden = {"blocks": {"0": {"attn": params["blocks"]["0"]["attn"], "mlp": params["blocks"]["0"]["mlp"]}}}
    head = {"unembed": params["unembed"]}
    rest = {"blocks": {"0": {"norm": params["blocks"]["0"]["norm"]}}, "embed": params["embed"],
            "final_norm": params["final_norm"]}
    refs = [(hidden, soap_lib.soap(0.02, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=0.1,
                                   precondition_frequency=2, mask=factory.decay_mask)),
            (head, optax.adamw(0.005, o.b1, o.b2, o.eps, weight_decay=0.1, mask=factory.decay_mask)),
            (rest, optax.adamw(0.01, o.b1, o.b2, o.eps, weight_decay=0.1, mask=factory.decay_mask))]
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(4)]

    state, p = tx.init(params), params
    for g in grads:
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    for sub, ref in refs:
        rstate, rp = ref.init(sub), sub
        for g in grads:
            gs = jax.tree.map(lambda _, x: x, sub, _prune(g, sub))
            u, rstate = ref.update(gs, rstate, rp)
            rp = optax.apply_updates(rp, u)
        for path, want in jax.tree_util.tree_flatten_with_path(rp)[0]:
            got = _prune(p, sub)
            got = jax.tree_util.tree_flatten_with_path(got)[0]
            np.testing.assert_allclose(dict(got)[path], want, rtol=1e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))


def _prune(tree, like):
    return {k: _prune(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


@pytest.mark.parametrize("changes,key", [
    (dict(name="adamx"), "optimizer.name"),
    (dict(learning_rate=0.0), "optimizer.learning_rate"),
    (dict(learning_rate=-1e-3), "optimizer.learning_rate"),
    (dict(b1=1.0), "optimizer.b1"),
    (dict(b2=-0.1), "optimizer.b2"),
    (dict(precondition_frequency=0), "optimizer.precondition_frequency"),
    (dict(schedule="exp"), "optimizer.schedule"),
    (dict(groups=({"name": "g", "pattern": "^nothing_here", "optimizer": "soap"},)), "'g'"),
    (dict(groups=({"name": "g", "pattern": "kernel", "optimizer": "adamz"},)), "optimizer.groups[0].optimizer"),
    (dict(groups=({"name": "a", "pattern": "^unembed/", "optimizer": "soap"},
                  {"name": "b", "pattern": "kernel$", "optimizer": "lion"})), "unembed/kernel"),
])
def test_bad_input_is_one_line_config_error(changes, key):
    with pytest.raises(ConfigError) as err:
        factory.make_optimizer(_cfg(**changes), 10, _params())
    message = str(err.value)
    assert key in message and "\n" not in message, message


def _mesh():
    return jax.make_mesh((2, 4, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def test_soap_state_split_over_every_device():
    mesh = _mesh()  # data=2, fsdp=4
    abstract = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "b": jax.ShapeDtypeStruct((32,), jnp.float32),
                "v": jax.ShapeDtypeStruct((12, 20), jnp.float32)}
    shardings = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P()),
                 "v": NamedSharding(mesh, P())}
    tx, _ = factory.make_optimizer(_cfg(name="soap", grad_clip=1.0, weight_decay=0.1), 10, abstract)
    out = factory.opt_state_shardings(tx, abstract, shardings, mesh)
    soap_state = out[1].soap
    w = soap_state.precond["w"]
    # Statistics rows and basis columns over all 8 devices, whatever the parameter's own sharding.
    assert [st.spec for st in w.stats] == [P(("data", "fsdp"), None)] * 2
    assert [q.spec for q in w.bases] == [P(None, ("data", "fsdp"))] * 2
    # Neither 12 nor 20 splits 8 ways: the largest set of axes that divides each, fsdp (4).
    v = soap_state.precond["v"]
    assert [st.spec for st in v.stats] == [P("fsdp", None)] * 2
    # mu follows the parameter; nu (eigenbasis) is split along the larger side, like the step.
    assert soap_state.mu["w"].spec == P("fsdp", None)
    assert soap_state.nu["w"].spec == P(("data", "fsdp"), None)
    assert soap_state.nu["v"].spec == P(None, "fsdp")
    assert soap_state.count.is_fully_replicated and out[1].count.is_fully_replicated

    # The shardings are usable: init and a step compile and run with them.
    with jax.set_mesh(mesh):
        params = jax.device_put({"w": jnp.ones((64, 32)), "b": jnp.ones((32,)), "v": jnp.ones((12, 20))},
                                shardings)
        state = jax.jit(tx.init, out_shardings=out)(params)
        assert state[1].soap.precond["w"].stats[0].sharding.spec == P(("data", "fsdp"), None)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p), out_shardings=(shardings, out))
        for _ in range(2):
            u, state = step(params, state, params)
        assert bool(jnp.all(jnp.isfinite(u["w"])))


def test_derived_shardings_for_groups_adalayer_adafactor():
    mesh = _mesh()
    abstract = {"h": {"kernel": jax.ShapeDtypeStruct((128, 256), jnp.float32)},
                "unembed": {"kernel": jax.ShapeDtypeStruct((32, 64), jnp.float32)},
                "n": {"scale": jax.ShapeDtypeStruct((32,), jnp.float32)}}
    shardings = {"h": {"kernel": NamedSharding(mesh, P("fsdp", None))},
                 "unembed": {"kernel": NamedSharding(mesh, P("fsdp", None))},
                 "n": {"scale": NamedSharding(mesh, P())}}
    groups = ({"name": "fac", "pattern": "^h/", "optimizer": "adafactor", "lr_multiplier": 1.0},)
    tx, _ = factory.make_optimizer(_cfg(name="adalayer", groups=groups), 10, abstract)
    out = factory.opt_state_shardings(tx, abstract, shardings, mesh)
    inner = out[0].inner_states  # chain(multi_transform) with clipping off
    fac = inner["fac"].inner_state[0][0]  # chain(scale_by_factored_rms, ...) state
    assert fac.v_row["h"]["kernel"].spec == P("fsdp")  # mean over the 256-dim leaves the 128 rows
    assert fac.v_col["h"]["kernel"].spec == P(None)
    ada = inner[factory.MAIN].inner_state[0]
    assert ada.mu["unembed"]["kernel"].spec == P("fsdp", None)
    assert ada.nu["unembed"]["kernel"].spec == P(None, None)  # [1, 64]: the sharded dim is reduced
