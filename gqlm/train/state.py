"""TrainState and its sharded initialisation.

Init follows eval_shape -> shardings -> jit(init, out_shardings): every array is created directly
in its shards, so no device ever holds a full replica of a sharded parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict
from gqlm.models.transformer import Transformer
from gqlm.optim.factory import opt_state_shardings


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # pure dict of arrays
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key, for stochastic layers (router jitter)


class Model(NamedTuple):
    """Everything static about the model: how to rebuild it and how its params are laid out."""
    graphdef: nnx.GraphDef
    abstract_params: Any  # pure dict of ShapeDtypeStruct
    param_shardings: Any  # pure dict of NamedSharding


def model_layout(abstract_module: nnx.Module, rules, mesh: Mesh, *filters: Any) -> Model:
    """The Model of an abstract module (`nnx.eval_shape`): its state (of `filters`) as pure-dict
    ShapeDtypeStructs, with the shardings its logical axes map to."""
    graphdef, abstract_state = nnx.split(abstract_module, *filters)
    shardings = mesh_lib.param_shardings(abstract_state, rules, mesh)
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    return Model(graphdef, abstract_params, shardings)


def build_model(model_cfg: ConfigDict, rules, mesh: Mesh) -> Model:
    """Abstract transformer (nothing allocated) with the shardings its logical axes map to."""
    return model_layout(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), rules, mesh)


def init_params(model_cfg: ConfigDict, rng: jax.Array) -> Any:
    return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(params=rng))))


def state_shardings(model: Model, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    replicated = mesh_lib.replicated(mesh)
    return TrainState(
        step=replicated,
        params=model.param_shardings,
        opt_state=opt_state_shardings(tx, model.abstract_params, model.param_shardings, mesh),
        rng=replicated,
    )


def abstract_state(model: Model, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target and the dry-run report."""
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=model.abstract_params,
        opt_state=jax.eval_shape(tx.init, model.abstract_params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    return with_shardings(shapes, shardings)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` carrying the matching `shardings` (a restore target)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(model_cfg: ConfigDict, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState, params: Any = None) -> TrainState:
    """Initialises parameters (unless given, already on their shardings: they are donated) and
    optimizer state directly into their shards."""
    def init(key, params):
        param_key, state_key = jax.random.split(key)
        if params is None:
            params = init_params(model_cfg, param_key)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key)
    return jax.jit(init, out_shardings=shardings, donate_argnums=1)(jax.random.PRNGKey(seed), params)


def describe(abstract: TrainState) -> dict[str, Any]:
    """Per-device memory of params and optimizer state, for --dry_run and logs."""
    def per_device(tree: Any) -> int:
        leaves = jax.tree.leaves(tree)
        return mesh_lib.bytes_per_device(leaves, [leaf.sharding for leaf in leaves])
    return {"param_bytes_per_device": per_device(abstract.params),
            "opt_bytes_per_device": per_device(abstract.opt_state)}


def param_sharding_table(model: Model) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, PartitionSpec) of every parameter."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(model.abstract_params)[0]
    shardings = jax.tree.leaves(model.param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, shardings):
        rows.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape), str(sharding.spec)))
    return rows
