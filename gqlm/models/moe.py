"""Mixture-of-experts SwiGLU MLP: top-k router, dropless or capacity dispatch, expert parallelism.

B batch, T length, D model dim, F expert mlp dim, E experts, K experts per token, L experts per
device, G devices on the `expert` mesh axis, M token copies, C capacity, R rows per expert.

Routing and the aux losses run on global arrays (GSPMD shards them over the batch like any other
activation). Dispatch, the expert matmuls and the combine run per device inside `jax.shard_map`
whenever the current mesh shards the batch or the experts: tokens stay on their device (batch
over the data-parallel axes of the rules table, `batch` -> data, fsdp, expert) and each device
gets the full weights of its E / G experts (an all-gather over fsdp/tensor, transposed to a
reduce-scatter for the gradient). With G > 1 the copies travel to the device that holds their
expert with `all_to_all` and come back the same way.

Memory: dropless expert parallelism sends worst-case buffers (every local copy could go to one
device): G x (B_local T K) x D per device each way, and the receiving device runs its experts
over up to G x B_local T K rows: the `ragged` backend skips the empty ones, the `dense` one
(expert blocks in a loop) computes only the blocks its rows fill (the real rows plus under one
block per local expert) and recomputes the SwiGLU pre-activations in the backward pass instead of
keeping [G x B_local T K, F] buffers.
Capacity dispatch needs only E x C x B_local rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gqlm.config import DEFAULT_RULES, ConfigDict
from gqlm.mesh import fit_spec, logical_to_spec
from gqlm.models import moe_dispatch as md
from gqlm.models import moe_router as mr
from gqlm.models.layers import Mlp, dtypes, normal_param, output_std

EXPERT_AXIS = "expert"


def resolve_backend(backend: str) -> str:
    """`auto`: ragged_dot where it is a grouped GEMM (GPU/TPU), the blocked einsum elsewhere."""
    if backend == "auto":
        return "ragged" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "dense"
    return backend


def _all_to_all(x: jax.Array, axis: str | None) -> jax.Array:
    """Block g of axis 0 goes to device g of `axis`; block g of the result came from device g."""
    return x if axis is None else jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def dropless_local(x_BTD: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array,
                   w: md.ExpertWeights, backend: str) -> jax.Array:
    """Dropless MoE with every expert on this device."""
    b, t, k = experts_BTK.shape
    y_MD = md.grouped_swiglu(md.token_copies(x_BTD, k), experts_BTK.reshape(-1), w, backend)
    return md.combine(y_MD.reshape(b, t, k, -1), weights_BTK)


def dropless_expert_parallel(x_BTD: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array,
                             w_local: md.ExpertWeights, backend: str, axis: str,
                             num_devices: int) -> jax.Array:
    """Dropless MoE with this device's L experts; copies cross devices with all_to_all."""
    b, t, k = experts_BTK.shape
    x_MD = md.token_copies(x_BTD, k)
    num_rows, dim = x_MD.shape
    num_local = w_local.gate_EDF.shape[0]
    send_GMD, local_GM, slot_M, src_N = md.pack_for_devices(
        x_MD, experts_BTK.reshape(-1), num_devices, num_local)
    recv_GMD = _all_to_all(send_GMD, axis)
    recv_local_GM = _all_to_all(local_GM, axis)
    # On average M of the G x M received rows are real: the dense backend computes for that many.
    y_recv_GMD = md.grouped_swiglu(recv_GMD.reshape(num_devices * num_rows, dim),
                                   recv_local_GM.reshape(-1), w_local, backend, expected_rows=num_rows)
    y_back_GMD = _all_to_all(y_recv_GMD.reshape(num_devices, num_rows, dim), axis)
    y_MD = md.permute_rows(y_back_GMD.reshape(num_devices * num_rows, dim), slot_M, src_N)
    return md.combine(y_MD.reshape(b, t, k, dim), weights_BTK)


def capacity_moe(x_BTD: jax.Array, slot_BTK: jax.Array, weights_BTK: jax.Array,
                 w_local: md.ExpertWeights, num_experts: int, cap: int,
                 axis: str | None = None) -> jax.Array:
    """Capacity MoE: [E, C] buffers per sequence; with `axis`, expert e's rows go to its device."""
    b, t, d = x_BTD.shape
    num_local = w_local.gate_EDF.shape[0]
    num_devices = num_experts // num_local
    x_BECD = md.dispatch_capacity(x_BTD, slot_BTK, num_experts, cap)
    x_GLRD = x_BECD.transpose(1, 0, 2, 3).reshape(num_devices, num_local, b * cap, d)
    x_GLRD = _all_to_all(x_GLRD, axis)  # now axis 0 is the source device
    x_LRD = x_GLRD.transpose(1, 0, 2, 3).reshape(num_local, num_devices * b * cap, d)
    y_LRD = md.swiglu_batched(x_LRD, w_local)
    y_GLRD = _all_to_all(y_LRD.reshape(num_local, num_devices, b * cap, d).transpose(1, 0, 2, 3), axis)
    y_BECD = y_GLRD.reshape(num_experts, b, cap, d).transpose(1, 0, 2, 3)
    return md.combine(md.gather_capacity(y_BECD, slot_BTK), weights_BTK)


def _mesh_plan(mesh: Any, rules: Sequence, batch_shape: Sequence[int]) -> tuple[P, int] | None:
    """(batch PartitionSpec, expert-axis size) when the mesh shards the MoE; None for the local path."""
    if mesh is None or mesh.empty:
        return None
    num_devices = mesh.shape.get(EXPERT_AXIS, 1)
    spec = fit_spec(logical_to_spec(("batch", "length", "embed"), rules, mesh), batch_shape, mesh)
    batch_axes = spec[0] if spec else None
    if num_devices == 1 and not batch_axes:
        return None
    return P(batch_axes), num_devices


def apply_experts(x_BTD: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array,
                  slot_BTK: jax.Array | None, w: md.ExpertWeights, *, backend: str,
                  cap: int, rules: Sequence = DEFAULT_RULES) -> jax.Array:
    """Dispatch + experts + combine, local or in shard_map over the current abstract mesh.

    `slot_BTK` (capacity dispatch) or None (dropless). Invalid copies carry expert id E.
    """
    num_experts = w.gate_EDF.shape[0]
    plan = _mesh_plan(jax.sharding.get_abstract_mesh(), rules, x_BTD.shape)
    if plan is None:
        if slot_BTK is None:
            return dropless_local(x_BTD, experts_BTK, weights_BTK, w, backend)
        return capacity_moe(x_BTD, slot_BTK, weights_BTK, w, num_experts, cap)
    batch_spec, num_devices = plan
    axis = EXPERT_AXIS if num_devices > 1 else None
    w_spec = md.ExpertWeights(*(P(axis),) * 3)

    if slot_BTK is not None:
        def per_device(x_BTD, slot_BTK, weights_BTK, w_local):
            return capacity_moe(x_BTD, slot_BTK, weights_BTK, w_local, num_experts, cap, axis)
        routing_BTK = slot_BTK
    else:
        def per_device(x_BTD, experts_BTK, weights_BTK, w_local):
            if axis is None:
                return dropless_local(x_BTD, experts_BTK, weights_BTK, w_local, backend)
            return dropless_expert_parallel(x_BTD, experts_BTK, weights_BTK, w_local, backend,
                                            axis, num_devices)
        routing_BTK = experts_BTK
    return jax.shard_map(per_device, in_specs=(batch_spec, batch_spec, batch_spec, w_spec),
                         out_specs=batch_spec, check_vma=False)(x_BTD, routing_BTK, weights_BTK, w)


def _hashable_rules(rules: Sequence) -> tuple:
    """Rules as nested tuples (a config restored from JSON may hold lists)."""
    return tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules)


class MoeMLP(nnx.Module):
    """Top-k mixture of SwiGLU experts (plus an optional always-on shared expert).

    `__call__(x_BTD, segment_ids_BT, jitter_key=None, rules=None) -> (y_BTD, aux)`; aux holds
    float32 unweighted `lb_loss`, `z_loss`, `drop_fraction`, `router_entropy`, `load` ([E],
    fraction of real token copies per expert) and `max_load` (E * max load: 1 when balanced, a
    scalar for logs). Padding tokens get 0 from the experts. Router jitter needs `jitter_key`
    (training only). `rules` (config.mesh.rules) overrides the rules given at construction: they
    decide how the batch is split over devices inside shard_map.
    """

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs, rules: Sequence = DEFAULT_RULES):
        e = cfg.moe
        param_dtype, self.compute_dtype = dtypes(cfg)
        d, f, n = cfg.embed_dim, e.mlp_dim or cfg.mlp_dim, e.num_experts
        self.num_experts, self.top_k = n, e.top_k
        self.dispatch, self.capacity_factor = e.dispatch, e.capacity_factor
        self.backend, self.jitter = e.backend, e.router_jitter
        self.rules = _hashable_rules(rules)
        self.router = normal_param(rngs, (d, n), ("embed", None), cfg.init_std, param_dtype)
        self.wi_gate = normal_param(rngs, (n, d, f), ("expert", "embed", "expert_mlp"),
                                    cfg.init_std, param_dtype)
        self.wi_up = normal_param(rngs, (n, d, f), ("expert", "embed", "expert_mlp"),
                                  cfg.init_std, param_dtype)
        self.wo = normal_param(rngs, (n, f, d), ("expert", "expert_mlp", "embed"),
                               output_std(cfg), param_dtype)
        self.shared = Mlp(cfg, rngs=rngs, mlp_dim=f) if e.shared_expert else None

    def expert_weights(self) -> md.ExpertWeights:
        cdt = self.compute_dtype
        return md.ExpertWeights(self.wi_gate[...].astype(cdt), self.wi_up[...].astype(cdt),
                                self.wo[...].astype(cdt))

    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, jitter_key: jax.Array | None = None,
                 rules: Sequence | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        rules = self.rules if rules is None else _hashable_rules(rules)
        valid_BT = segment_ids_BT > 0
        mask_BT = valid_BT.astype(jnp.float32)
        r = mr.route(x_BTD, self.router[...], self.top_k, jitter=self.jitter, jitter_key=jitter_key)
        experts_BTK = jnp.where(valid_BT[..., None], r.experts_BTK, self.num_experts)
        x_BTD = x_BTD.astype(self.compute_dtype)
        if self.dispatch == "capacity":
            cap = md.capacity(self.capacity_factor, x_BTD.shape[1], self.top_k, self.num_experts)
            rank_BTK = md.capacity_ranks(r.experts_BTK, valid_BT, self.num_experts)
            keep_BTK = valid_BT[..., None] & (rank_BTK < cap)
            slot_BTK = md.capacity_slots(r.experts_BTK, keep_BTK, rank_BTK, self.num_experts, cap)
            dropped = jnp.sum(mask_BT[..., None] * (1.0 - keep_BTK.astype(jnp.float32)))
            drop_fraction = dropped / jnp.maximum(jnp.sum(mask_BT) * self.top_k, 1.0)
        else:
            cap, slot_BTK, drop_fraction = 0, None, jnp.zeros((), jnp.float32)
        y_BTD = apply_experts(x_BTD, experts_BTK, r.weights_BTK, slot_BTK, self.expert_weights(),
                              backend=resolve_backend(self.backend), cap=cap, rules=rules)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        load_E = mr.expert_load(r.experts_BTK, mask_BT, self.num_experts)
        aux = {
            "lb_loss": mr.load_balancing_loss(r.probs_BTE, r.experts_BTK, mask_BT),
            "z_loss": mr.z_loss(r.logits_BTE, mask_BT),
            "drop_fraction": drop_fraction,
            "router_entropy": mr.router_entropy(r.probs_BTE, mask_BT),
            "load": load_E,
            "max_load": self.num_experts * jnp.max(load_E),  # 1 when balanced; a loggable scalar
        }
        return y_BTD, aux
