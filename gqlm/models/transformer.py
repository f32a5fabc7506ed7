"""Decoder-only language model: embedding, pre-norm blocks (dense or MoE MLP), final norm, head.

B batch, T length, D model dim, V vocab, L layers; for the KV cache (`cached`): G kv heads,
S cache slots, K head dim.

`Transformer(config.model, rngs=...)(inputs_BT, positions_BT, segment_ids_BT)` returns float32
`logits_BTV` and `aux`, a dict of auxiliary losses/metrics: empty for a dense model; for MoE
layers the losses (`lb_loss`, `z_loss`) are summed over layers and the diagnostics (`load`,
`max_load`, `drop_fraction`, `router_entropy`) averaged, and each is kept per layer as
f"layer_{i}/{key}". Two keyword
arguments reach the MoE layers only: `jitter_key` (router jitter, training only; layer i gets
`split(jitter_key, L)[i]`) and `rules` (the logical axis rules, `config.mesh.rules`).

Blocks live in `self.blocks`: an `nnx.List` (pure-dict keys 0..L-1) or, with
`model.scan_layers`, one block whose parameters are stacked on a leading 'layers' axis and run
with `nnx.scan` (faster to compile for deep models; slower on XLA:CPU).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gqlm.config import ConfigDict, ConfigError, moe_layer_indices
from gqlm.models.attention import Attention
from gqlm.models.layers import Embedding, Mlp, RMSNorm, dtypes, normal_param

Aux = dict[str, jax.Array]


class Block(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); the MLP is dense or a mixture of experts."""

    def __init__(self, cfg: ConfigDict, *, moe: bool, rngs: nnx.Rngs):
        param_dtype, compute_dtype = dtypes(cfg)
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype, compute_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype, compute_dtype)
        if moe:
            from gqlm.models.moe import MoeMLP  # lazy: dense models never need moe.py
            self.mlp = MoeMLP(cfg, rngs=rngs)
        else:
            self.mlp = Mlp(cfg, rngs=rngs)
        self.is_moe = moe

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 jitter_key: jax.Array | None = None,
                 rules: Sequence | None = None) -> tuple[jax.Array, Aux]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT).astype(x_BTD.dtype)
        return self._mlp_residual(x_BTD, segment_ids_BT, jitter_key, rules)

    def cached(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
               k_BGSK: jax.Array, v_BGKS: jax.Array,
               rules: Sequence | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block over T new tokens attending to this layer's KV cache (`Attention.cached`)."""
        y_BTD, k_BGSK, v_BGKS = self.attn.cached(self.attn_norm(x_BTD), positions_BT, k_BGSK, v_BGKS)
        x_BTD, _ = self._mlp_residual(x_BTD + y_BTD.astype(x_BTD.dtype), segment_ids_BT, None, rules)
        return x_BTD, k_BGSK, v_BGKS

    def _mlp_residual(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, jitter_key: jax.Array | None,
                      rules: Sequence | None) -> tuple[jax.Array, Aux]:
        h_BTD = self.mlp_norm(x_BTD)
        if self.is_moe:
            # Only what was given is passed on, so any MoE module with __call__(x, seg) fits.
            extra = {k: v for k, v in (("jitter_key", jitter_key), ("rules", rules)) if v is not None}
            y_BTD, aux = self.mlp(h_BTD, segment_ids_BT, **extra)
        else:
            y_BTD, aux = self.mlp(h_BTD), {}
        return x_BTD + y_BTD.astype(x_BTD.dtype), dict(aux)


def _block_fn(rules: Sequence | None) -> Callable:
    """block(x, positions, segments, jitter_key) with the (static) rules closed over, so that
    nnx.remat and nnx.scan see only array arguments."""
    def apply(block: Block, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
              jitter_key: jax.Array | None) -> tuple[jax.Array, Aux]:
        return block(x_BTD, positions_BT, segment_ids_BT, jitter_key, rules)
    return apply


_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}
_REMAT_POLICIES = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,  # model.remat
                   "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _stacked_blocks(cfg: ConfigDict, moe: bool, rngs: nnx.Rngs) -> Block:
    """L blocks created by vmap: every parameter gets a leading 'layers' axis."""
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, moe=moe, rngs=rngs)
    return make(rngs)


class Transformer(nnx.Module):
    """Decoder LM; `cfg` is `config.model` with `vocab_size` already resolved (> 0)."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size={cfg.vocab_size} must be resolved to a positive size")
        param_dtype, compute_dtype = dtypes(cfg)
        self.embed = Embedding(cfg, rngs=rngs)
        moe_layers = set(moe_layer_indices(cfg))
        self.num_layers = cfg.num_layers
        self.scan_layers = bool(cfg.scan_layers)
        self.remat = cfg.remat
        if self.scan_layers:  # config.model.validate: all layers alike
            self.blocks = _stacked_blocks(cfg, bool(moe_layers), rngs)
        else:
            self.blocks = nnx.List([Block(cfg, moe=i in moe_layers, rngs=rngs)
                                    for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype, compute_dtype)
        self.tie_embeddings = bool(cfg.tie_embeddings)
        if not self.tie_embeddings:
            self.unembed = normal_param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"),
                                        cfg.init_std, param_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, inputs_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array, *,
                 jitter_key: jax.Array | None = None,
                 rules: Sequence[tuple[str, Any]] | None = None) -> tuple[jax.Array, Aux]:
        x_BTD = self.embed(inputs_BT)
        block_fn = _block_fn(rules)
        if self.remat != "none":
            block_fn = nnx.remat(block_fn, policy=_REMAT_POLICIES[self.remat])
        keys_L = None if jitter_key is None else jax.random.split(jitter_key, self.num_layers)
        if self.scan_layers:
            x_BTD, aux_by_layer = self._run_scanned(block_fn, x_BTD, positions_BT, segment_ids_BT, keys_L)
        else:
            per_layer = []
            for i, block in enumerate(self.blocks):
                key = None if keys_L is None else keys_L[i]
                x_BTD, layer_aux = block_fn(block, x_BTD, positions_BT, segment_ids_BT, key)
                per_layer.append(layer_aux)
            aux_by_layer = dict(enumerate(per_layer))
        return self._head(x_BTD), _summarise_aux(aux_by_layer)

    def _head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and output projection: float32 logits_BTV."""
        x_BTD = self.final_norm(x_BTD)
        if self.tie_embeddings:
            return self.embed.attend(x_BTD)
        return jnp.einsum("btd,dv->btv", x_BTD, self.unembed[...].astype(self.compute_dtype),
                          preferred_element_type=jnp.float32)

    def cached(self, inputs_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
               k_LBGSK: Any, v_LBGKS: Any, *,
               rules: Sequence[tuple[str, Any]] | None = None) -> tuple[jax.Array, Any, Any]:
        """Logits of T new tokens per row that also attend to a KV cache (models/decode.py).

        The cache holds every layer's keys and values, slot s at position s of its row: a tuple
        of L [B, G, S, K] arrays, each updated in place, or with `scan_layers` one array stacked
        on axis 0 (scanned, so each step copies it layer by layer). The new tokens' entries are
        written at `positions_BT`. Returns (logits_BTV, k_LBGSK, v_LBGKS).
        """
        x_BTD = self.embed(inputs_BT)
        if self.scan_layers:
            def layer(block, x_BTD, positions_BT, segment_ids_BT, k_BGSK, v_BGKS):
                x_BTD, k_BGSK, v_BGKS = block.cached(x_BTD, positions_BT, segment_ids_BT, k_BGSK, v_BGKS, rules)
                return x_BTD, (k_BGSK, v_BGKS)
            scan = nnx.scan(layer, in_axes=(0, nnx.Carry, None, None, 0, 0), out_axes=(nnx.Carry, 0),
                            transform_metadata=_LAYERS_AXIS)
            x_BTD, (k_LBGSK, v_LBGKS) = scan(self.blocks, x_BTD, positions_BT, segment_ids_BT, k_LBGSK, v_LBGKS)
        else:
            k_LBGSK, v_LBGKS = list(k_LBGSK), list(v_LBGKS)
            for i, block in enumerate(self.blocks):
                x_BTD, k_LBGSK[i], v_LBGKS[i] = block.cached(x_BTD, positions_BT, segment_ids_BT,
                                                             k_LBGSK[i], v_LBGKS[i], rules)
            k_LBGSK, v_LBGKS = tuple(k_LBGSK), tuple(v_LBGKS)
        return self._head(x_BTD), k_LBGSK, v_LBGKS

    def _run_scanned(self, block_fn: Callable, x_BTD: jax.Array, positions_BT: jax.Array,
                     segment_ids_BT: jax.Array,
                     keys_L: jax.Array | None) -> tuple[jax.Array, dict[int, Aux]]:
        key_axis = None if keys_L is None else 0
        scan = nnx.scan(block_fn, in_axes=(0, nnx.Carry, None, None, key_axis), out_axes=(nnx.Carry, 0),
                        transform_metadata=_LAYERS_AXIS)
        x_BTD, stacked = scan(self.blocks, x_BTD, positions_BT, segment_ids_BT, keys_L)
        return x_BTD, {i: {k: v[i] for k, v in stacked.items()} for i in range(self.num_layers)}


SUMMED_AUX = ("lb_loss", "z_loss")  # they join the objective once per layer; the rest are rates


def _summarise_aux(by_layer: dict[int, Aux]) -> Aux:
    """Sums the losses and averages the diagnostics over layers (a drop fraction of 1.75 or a
    balanced max_load of 2 read wrong); keeps per-layer copies as 'layer_{i}/{key}'."""
    out: Aux = {}
    for i, aux in by_layer.items():
        for key, value in aux.items():
            out[key] = out[key] + value if key in out else value
            out[f"layer_{i}/{key}"] = value
    for key in {k for aux in by_layer.values() for k in aux} - set(SUMMED_AUX):
        out[key] = out[key] / sum(key in aux for aux in by_layer.values())  # over the MoE layers only
    return out
