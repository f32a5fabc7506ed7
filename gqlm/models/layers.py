"""Building blocks: logically named parameters, RMSNorm, token embedding, SwiGLU MLP.

B batch, T length, D model dim, F mlp dim, V vocab.

Every parameter carries logical axis names (`out_sharding` metadata, never sharded eagerly): the
rules table in `config.mesh.rules` maps them to mesh axes. Parameters are stored in
`param_dtype` and cast to `compute_dtype` where they are used; norms run in float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gqlm.config import ConfigDict


def logical_param(value: jax.Array, names: Sequence[str]) -> nnx.Param:
    """An nnx.Param annotated with one logical axis name per dimension."""
    names = tuple(names)
    if len(names) != value.ndim:
        raise ValueError(f"logical names {names} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str], std: float,
                 dtype: jnp.dtype) -> nnx.Param:
    """N(0, std^2) weights, drawn in float32 then stored in `dtype`."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return logical_param(value.astype(dtype), names)


def dtypes(cfg: ConfigDict) -> tuple[jnp.dtype, jnp.dtype]:
    """(param_dtype, compute_dtype) of a model config."""
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)


def output_std(cfg: ConfigDict) -> float:
    """Init std of projections that write into the residual stream: scaled by 1/sqrt(2 L)."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32; returns `out_dtype`."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, out_dtype: jnp.dtype):
        self.scale = logical_param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.out_dtype = out_dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = x_BTD.astype(jnp.float32)
        ms_BT1 = jnp.mean(jnp.square(x_BTD), axis=-1, keepdims=True)
        y_BTD = x_BTD * jax.lax.rsqrt(ms_BT1 + self.eps) * self.scale[...].astype(jnp.float32)[None, None, :]
        return y_BTD.astype(self.out_dtype)


class Embedding(nnx.Module):
    """Token embedding table [V, D]; `attend` reuses it as the (tied) output head."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        param_dtype, self.compute_dtype = dtypes(cfg)
        self.table = normal_param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"),
                                  cfg.init_std, param_dtype)

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], ids_BT, axis=0).astype(self.compute_dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits in float32 (accumulated in float32 whatever the compute dtype)."""
        table_VD = self.table[...].astype(self.compute_dtype)
        return jnp.einsum("btd,vd->btv", x_BTD.astype(self.compute_dtype), table_VD,
                          preferred_element_type=jnp.float32)


class Mlp(nnx.Module):
    """SwiGLU: wo(silu(x wi_gate) * (x wi_up))."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs, mlp_dim: int | None = None):
        param_dtype, self.compute_dtype = dtypes(cfg)
        D, F = cfg.embed_dim, mlp_dim or cfg.mlp_dim
        self.wi_gate = normal_param(rngs, (D, F), ("embed", "mlp"), cfg.init_std, param_dtype)
        self.wi_up = normal_param(rngs, (D, F), ("embed", "mlp"), cfg.init_std, param_dtype)
        self.wo = normal_param(rngs, (F, D), ("mlp", "embed"), output_std(cfg), param_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cdt = self.compute_dtype
        x_BTD = x_BTD.astype(cdt)
        gate_BTF = jnp.einsum("btd,df->btf", x_BTD, self.wi_gate[...].astype(cdt))
        up_BTF = jnp.einsum("btd,df->btf", x_BTD, self.wi_up[...].astype(cdt))
        h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        return jnp.einsum("btf,fd->btd", h_BTF, self.wo[...].astype(cdt))
