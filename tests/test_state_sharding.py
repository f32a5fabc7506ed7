"""opt_state_shardings, leaf by leaf, against shardings worked out here from each state field's
meaning, for every zoo optimizer alone and as a parameter group (optax.multi_transform), on a
2-layer model's parameter tree (a pure dict with integer layer keys, as nnx.to_pure_dict gives)."""

import math

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.tree_util import DictKey, SequenceKey

from gqlm.config import base_config
from gqlm.optim.adalayer import path_str
from gqlm.optim.factory import decay_mask
from gqlm.optim.state_sharding import opt_state_shardings
from gqlm.optim.zoo import BUILDERS

FSDP = ("fsdp",)
PRECOND_FIELDS = ("stats", "bases")  # soap.Preconditioner: one [d, d] array (or None) per dimension
EMBED, HEADS, HEAD_DIM, MLP, VOCAB = 128, 2, 64, 256, 256  # the MLP and vocab matrices factor (>= 128)


def _block():
    qkv = ((EMBED, HEADS, HEAD_DIM), P("fsdp"))
    return {"attn": {"q": qkv, "k": qkv, "v": qkv, "o": ((HEADS, HEAD_DIM, EMBED), P(None, None, "fsdp"))},
            "attn_norm": {"scale": ((EMBED,), P())},
            "mlp": {"wi_gate": ((EMBED, MLP), P("fsdp")), "wi_up": ((EMBED, MLP), P("fsdp")),
                    "wo": ((MLP, EMBED), P(None, "fsdp"))},
            "mlp_norm": {"scale": ((EMBED,), P())}}


def _model(mesh):
    """(abstract params, shardings) of a 2-layer transformer with an untied, vocab-split head."""
    layout = {"blocks": {0: _block(), 1: _block()}, "embed": {"table": ((VOCAB, EMBED), P(None, "fsdp"))},
              "final_norm": {"scale": ((EMBED,), P())}, "unembed": ((EMBED, VOCAB), P(None, "fsdp"))}
    is_entry = lambda x: isinstance(x, tuple) and isinstance(x[1], P)  # noqa: E731
    params = jax.tree.map(lambda e: jax.ShapeDtypeStruct(e[0], jnp.float32), layout, is_leaf=is_entry)
    shardings = jax.tree.map(lambda e: NamedSharding(mesh, e[1]), layout, is_leaf=is_entry)
    return params, shardings


MESHES = {  # mesh shape -> the axes SOAP splits a [d, d] statistic over, per size d in the model
    (2, 4): {2: ("data",), 64: ("data", "fsdp"), 128: ("data", "fsdp"), 256: ("data", "fsdp")},
    (1, 8): {2: (), 64: FSDP, 128: FSDP, 256: FSDP},
}


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def _locate(path):
    """(field, parameter key path or None, Preconditioner part or None) of one state leaf."""
    pc = None
    if len(path) > 1 and isinstance(path[-1], SequenceKey) and getattr(path[-2], "name", "") in PRECOND_FIELDS:
        pc, path = (path[-2].name, path[-1].idx), path[:-2]
    n = len(path)
    while n and isinstance(path[n - 1], DictKey):
        n -= 1
    if n == len(path):
        return getattr(path[-1], "name", None), None, None
    return path[n - 1].name, tuple(k.key for k in path[n:]), pc


def _expected(path, leaf, params, shardings, mesh):
    """The spec of one state leaf, from what its field holds."""
    split = MESHES[tuple(mesh.shape.values())]
    field, key, pc = _locate(path)
    if key is None:  # counts, SOAP's `initialized`
        return (None,) * leaf.ndim
    param, sharding = params, shardings
    for k in key:
        param, sharding = param[k], sharding[k]
    spec = _padded(sharding.spec, param.ndim)
    in_soap = any(getattr(k, "name", None) == "soap" for k in path)
    if pc is not None:  # SOAP statistic rows / eigenbasis columns over every axis dividing d
        axes = _entry(split[leaf.shape[0]])
        return (axes, None) if pc[0] == "stats" else (None, axes)
    if in_soap and field == "nu" and param.ndim >= 2:  # eigenbasis: split along its most-split side
        devices = [math.prod(mesh.shape[a] for a in split[d]) for d in param.shape]
        k = max(range(param.ndim), key=lambda i: (devices[i], param.shape[i]))
        return tuple(_entry(split[param.shape[k]]) if i == k else None for i in range(param.ndim))
    if leaf.shape == param.shape:  # mu, nu, trace, ema, Adafactor's unfactored v
        return spec
    if field in ("v_row", "v_col") and leaf.ndim == param.ndim - 1:  # one dim averaged away
        dropped = next(i for i in range(param.ndim) if param.shape[:i] + param.shape[i + 1:] == leaf.shape)
        return spec[:dropped] + spec[dropped + 1:]
    if field == "nu":  # Adalayer: size-1 dims are reduced, the head keeps its vocabulary dim
        return tuple(e if n > 1 else None for n, e in zip(leaf.shape, spec))
    # Adafactor's placeholders: (1,) for the moments a parameter does not use
    assert field in ("v_row", "v_col", "v") and leaf.shape == (1,), (path, leaf.shape)
    return (None,)


FIELDS = {"adamw": {"mu", "nu"}, "lion": {"mu"}, "signum": {"ema"}, "adafactor": {"v_row", "v_col", "v"},
          "sgd": {"trace"}, "adalayer": {"mu", "nu"}, "soap": {"mu", "nu", "precond"}}


@pytest.mark.parametrize("mesh_shape", list(MESHES))
@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "group"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_shardings_follow_parameters(name, grouped, mesh_shape):
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params, shardings = _model(mesh)
    o = base_config().optimizer
    o.update(dict(weight_decay=0.1, adalayer_head_pattern=r"(^|/)unembed$"))
    tx = BUILDERS[name](optax.constant_schedule(1e-3), o, decay_mask)
    if grouped:  # as factory.make_optimizer: clipping, then the blocks in their own group
        labels = {k: jax.tree.map(lambda _, k=k: "hidden" if k == "blocks" else "main", v)
                  for k, v in params.items()}
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
            {"main": BUILDERS["adamw"](1e-3, o, decay_mask), "hidden": tx}, labels))
    got = opt_state_shardings(tx, params, shardings, mesh)
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(got) == jax.tree.structure(abstract)
    fields = set()
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(got), strict=True):
        assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh
        want = _expected(path, leaf, params, shardings, mesh)
        assert _padded(sharding.spec, leaf.ndim) == want, jax.tree_util.keystr(path)
        field, key, _ = _locate(path)
        if key is not None and (not grouped or key[0] == "blocks"):
            fields.add(field)
    assert fields == FIELDS[name]


def test_path_str_joins_keys_with_slashes():
    params, _ = _model(jax.make_mesh((8,), ("fsdp",)))
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert "blocks/0/attn/q" in paths and "blocks/1/mlp/wo" in paths
    assert "embed/table" in paths and "unembed" in paths
