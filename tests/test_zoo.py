"""Each zoo member against a NumPy implementation of its first steps (weight decay on, masked to
matrices, constant learning rate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqlm.config import base_config
from gqlm.optim import adalayer as AL
from gqlm.optim.factory import decay_mask
from gqlm.optim.zoo import BUILDERS

LR, WD, B1, B2, EPS = 0.05, 0.1, 0.9, 0.95, 1e-8


def _cfg(name):
    o = base_config().optimizer
    o.name, o.b1, o.b2, o.eps, o.weight_decay = name, B1, B2, EPS, WD
    return o


def _run(name, params, grads):
    tx = BUILDERS[name](LR, _cfg(name), decay_mask)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for g in grads:
        u, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, u)
    return jax.tree.map(np.asarray, params)


def _problem(shapes, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


def _numpy_run(params, grads, direction, init_state):
    """p <- p - lr * (direction + wd * p * [ndim >= 2]) with a per-leaf NumPy state machine."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    state = {k: init_state(v) for k, v in params.items()}
    for t, g in enumerate(grads, start=1):
        for k in params:
            d, state[k] = direction(g[k].astype(np.float64), state[k], t)
            params[k] = params[k] - LR * (d + WD * params[k] * (params[k].ndim >= 2))
    return params


def _adam(g, s, t):
    m, v = B1 * s[0] + (1 - B1) * g, B2 * s[1] + (1 - B2) * g * g
    return (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS), (m, v)


def _lion(g, m, t):
    return np.sign(B1 * m + (1 - B1) * g), B2 * m + (1 - B2) * g


def _signum(g, m, t):
    m = B1 * m + (1 - B1) * g
    return np.sign(m), m


def _sgd(g, m, t):
    m = B1 * m + g
    return m, m


REFERENCES = {
    "adamw": (_adam, lambda p: (np.zeros_like(p), np.zeros_like(p))),
    "lion": (_lion, np.zeros_like),
    "signum": (_signum, np.zeros_like),
    "sgd": (_sgd, np.zeros_like),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_member_matches_numpy(name):
    params, grads = _problem({"w": (3, 4), "b": (4,)})
    got = _run(name, params, grads)
    want = _numpy_run(params, grads, *REFERENCES[name])
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


def test_adafactor_first_step_factored_and_not():
    params, grads = _problem({"w": (128, 160), "s": (6, 5), "b": (5,)}, steps=1)

    def first(g, state, t):  # decay 1 - 1^-0.8 = 0 on the first step: v = g^2 + 1e-30
        sq = g * g + 1e-30
        if min(g.shape) >= 128 and g.ndim == 2:
            row, col = sq.mean(axis=1), sq.mean(axis=0)
            u = g / np.sqrt(np.outer(row / row.mean(), col))
        else:
            u = g / np.sqrt(sq)
        return u / max(1.0, np.sqrt(np.mean(u * u))), state

    got = _run("adafactor", params, grads)
    want = _numpy_run(params, grads, first, lambda p: None)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_adalayer_matches_numpy():
    shapes = {"blocks": {"mlp": {"kernel": (4, 6)}}, "final_norm": {"scale": (4,)},
              "unembed": {"kernel": (4, 7)}}
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
    got = _run("adalayer", params, grads)

    def make(head):
        def direction(g, s, t):
            block = (g * g).mean(axis=0, keepdims=True) if head else np.mean(g * g)
            m, v = B1 * s[0] + (1 - B1) * g, B2 * s[1] + (1 - B2) * block
            return (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS), (m, v)
        return direction, lambda p: (np.zeros_like(p), 0.0)

    for path, head in ((("blocks", "mlp", "kernel"), False), (("final_norm", "scale"), False),
                       (("unembed", "kernel"), True)):
        leaf = lambda tree: tree[path[0]][path[1]] if len(path) == 2 else tree[path[0]][path[1]][path[2]]  # noqa: E731
        want = _numpy_run({"x": leaf(params)}, [{"x": leaf(g)} for g in grads], *make(head))["x"]
        np.testing.assert_allclose(leaf(got), want, rtol=1e-5, atol=1e-6, err_msg="/".join(path))


def test_adalayer_second_moment_shapes():
    tx = AL.scale_by_adalayer(head_pattern=r"(^|/)unembed/")
    state = tx.init({"unembed": {"kernel": jnp.zeros((4, 7))}, "q": {"kernel": jnp.zeros((4, 2, 3))}})
    assert state.nu["unembed"]["kernel"].shape == (1, 7)
    assert state.nu["q"]["kernel"].shape == (1, 1, 1)


def test_soap_member_builds_and_first_call_is_zero():
    params, grads = _problem({"w": (3, 4), "b": (4,)}, steps=1)
    got = _run("soap", params, grads)
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])


def test_the_default_head_pattern_finds_the_models_untied_head():
    from flax import nnx

    from gqlm.models.transformer import Transformer
    cfg = base_config().model
    cfg.update({"tie_embeddings": False, "vocab_size": 128, "embed_dim": 16, "num_layers": 1, "num_heads": 2,
                "mlp_dim": 32})
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))
    tx = AL.scale_by_adalayer(head_pattern=base_config().optimizer.adalayer_head_pattern)
    nu = jax.eval_shape(tx.init, params).nu
    heads = [AL.path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(nu)[0] if max(v.shape) > 1]
    assert heads == ["unembed"]  # one v per output row there; every other tensor shares one scalar
    assert nu["unembed"].shape == (1, 128)
