"""MoE dispatch: moving token copies to experts, the per-expert SwiGLU, and combining back.

B batch, T length, D model dim, F expert mlp dim, E experts, K experts per token, M token copies
(rows), C capacity per expert per sequence, G devices on the `expert` mesh axis, L experts per
device (E / G), R rows per expert in a capacity buffer, NB blocks of a blocked matmul.

A copy is one (token, slot k) pair. Dropless dispatch sorts copies by expert and runs a grouped
matmul; capacity dispatch writes copies into fixed [E, C] buffers and drops the overflow. Expert
id E (one past the last) marks a copy that no expert processes (padding or dropped): its output
is 0. Every function here works on one device's arrays; `moe.py` wires them into `shard_map`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
    gate_EDF: jax.Array
    up_EDF: jax.Array
    out_EFD: jax.Array


# ----------------------------------------------------------------------------- expert compute


def swiglu_ragged(x_MD: jax.Array, group_sizes_E: jax.Array, w: ExpertWeights) -> jax.Array:
    """Grouped SwiGLU with `lax.ragged_dot` on rows sorted by expert; rows past the groups give 0."""
    gate_MF = jax.lax.ragged_dot(x_MD, w.gate_EDF, group_sizes_E)
    up_MF = jax.lax.ragged_dot(x_MD, w.up_EDF, group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate_MF) * up_MF, w.out_EFD, group_sizes_E)


def swiglu_batched(x_ERD: jax.Array, w: ExpertWeights) -> jax.Array:
    """SwiGLU of expert e applied to row block e: the einsum form of a grouped matmul."""
    gate_ERF = jnp.einsum("erd,edf->erf", x_ERD, w.gate_EDF)
    up_ERF = jnp.einsum("erd,edf->erf", x_ERD, w.up_EDF)
    return jnp.einsum("erf,efd->erd", jax.nn.silu(gate_ERF) * up_ERF, w.out_EFD)


def block_rows(num_rows: int, num_experts: int) -> int:
    """Rows per block of the blocked matmul: ~M/E, so padding costs at most ~1x extra FLOPs."""
    return max(8, -(-math.ceil(num_rows / num_experts) // 8) * 8)


def swiglu_blocked(x_MD: jax.Array, group_sizes_E: jax.Array, w: ExpertWeights,
                   rows_per_block: int | None = None) -> jax.Array:
    """Same result as `swiglu_ragged`, as a batched einsum over fixed-size blocks (fast on CPU).

    Each expert's group is padded to a whole number of blocks of b rows; every block belongs to
    one expert, whose weights are gathered per block. With b ~ M/E there are at most
    ceil(M/b) + E <= ~2E blocks. Padding rows are zeros and SwiGLU(0) = 0.
    """
    num_rows, dim = x_MD.shape
    num_experts = group_sizes_E.shape[0]
    b = rows_per_block or block_rows(num_rows, num_experts)
    num_blocks = -(-num_rows // b) + num_experts
    ends_E = jnp.cumsum(group_sizes_E)
    row_M = jnp.arange(num_rows)
    group_M = jnp.searchsorted(ends_E, row_M, side="right")  # E for rows past every group
    g_M = jnp.minimum(group_M, num_experts - 1)
    blocks_E = (group_sizes_E + b - 1) // b
    block_ends_E = jnp.cumsum(blocks_E)
    padded_row_M = (block_ends_E - blocks_E)[g_M] * b + row_M - (ends_E - group_sizes_E)[g_M]
    padded_row_M = jnp.where(group_M < num_experts, padded_row_M, num_blocks * b)
    x_NBbD = (jnp.zeros((num_blocks * b, dim), x_MD.dtype)
              .at[padded_row_M].add(x_MD, mode="drop").reshape(num_blocks, b, dim))
    expert_NB = jnp.minimum(jnp.searchsorted(block_ends_E, jnp.arange(num_blocks), side="right"),
                            num_experts - 1)
    block_w = ExpertWeights(*(a[expert_NB] for a in w))
    y_NBbD = swiglu_batched(x_NBbD, block_w)
    return y_NBbD.reshape(num_blocks * b, dim).at[padded_row_M].get(mode="fill", fill_value=0)


def grouped_swiglu(x_MD: jax.Array, expert_M: jax.Array, w: ExpertWeights, backend: str,
                   rows_per_block: int | None = None) -> jax.Array:
    """Expert expert_M[m] applied to row m (0 where expert_M[m] == E): sort, group matmul, unsort.

    `rows_per_block` (dense backend): defaults to ~M/E; pass ~(expected real rows)/E when most
    rows are empty (the worst-case buffers of expert parallelism) to pad less.
    """
    num_experts = w.gate_EDF.shape[0]
    order_M = jnp.argsort(expert_M, stable=True)
    group_sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
    x_sorted_MD = x_MD[order_M]
    if backend == "ragged":
        y_sorted_MD = swiglu_ragged(x_sorted_MD, group_sizes_E, w)
    elif backend == "dense":
        y_sorted_MD = swiglu_blocked(x_sorted_MD, group_sizes_E, w, rows_per_block)
    else:
        raise ValueError(f"MoE backend {backend!r} must be ragged or dense")
    return y_sorted_MD[jnp.argsort(order_M)]


# ----------------------------------------------------------------------------- copies


def token_copies(x_BTD: jax.Array, num_slots: int) -> jax.Array:
    """[B*T*K, D]: each token repeated K times, copy index (b*T + t)*K + k."""
    b, t, d = x_BTD.shape
    return jnp.broadcast_to(x_BTD[:, :, None, :], (b, t, num_slots, d)).reshape(b * t * num_slots, d)


def combine(y_BTKD: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """Weighted sum of each token's K expert outputs."""
    return jnp.einsum("btkd,btk->btd", y_BTKD, weights_BTK.astype(y_BTKD.dtype))


# ----------------------------------------------------------------------------- capacity


def capacity(capacity_factor: float, seq_len: int, top_k: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * T * K / E) copies per expert per sequence, at most T."""
    return min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts))


def capacity_ranks(experts_BTK: jax.Array, valid_BT: jax.Array, num_experts: int) -> jax.Array:
    """Each copy's position in its expert's queue within its sequence.

    Routing order (GShard/Switch): all top-1 copies of a sequence first, in token order, then all
    top-2 copies, and so on. Invalid (padding) tokens take no place in any queue.
    """
    b, t, k = experts_BTK.shape
    onehot_BKTE = jax.nn.one_hot(experts_BTK.transpose(0, 2, 1), num_experts, dtype=jnp.int32)
    onehot_BKTE = onehot_BKTE * valid_BT.astype(jnp.int32)[:, None, :, None]
    flat_BCE = onehot_BKTE.reshape(b, k * t, num_experts)
    rank_BC = jnp.sum((jnp.cumsum(flat_BCE, axis=1) - 1) * flat_BCE, axis=-1)
    return rank_BC.reshape(b, k, t).transpose(0, 2, 1)


def capacity_slots(experts_BTK: jax.Array, keep_BTK: jax.Array, rank_BTK: jax.Array,
                   num_experts: int, cap: int) -> jax.Array:
    """Row of each copy in its sequence's flattened [E*C] buffer; E*C (out of range) if not kept."""
    return jnp.where(keep_BTK, experts_BTK * cap + rank_BTK, num_experts * cap).astype(jnp.int32)


def dispatch_capacity(x_BTD: jax.Array, slot_BTK: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """[B, E, C, D] buffers; out-of-range slots (dropped or padding copies) are not written."""
    b, t, d = x_BTD.shape
    k = slot_BTK.shape[-1]

    def one_sequence(x_TD, slot_TK):
        x_TKD = jnp.broadcast_to(x_TD[:, None, :], (t, k, d))
        return jnp.zeros((num_experts * cap, d), x_TD.dtype).at[slot_TK].add(x_TKD, mode="drop")

    return jax.vmap(one_sequence)(x_BTD, slot_BTK).reshape(b, num_experts, cap, d)


def gather_capacity(y_BECD: jax.Array, slot_BTK: jax.Array) -> jax.Array:
    """[B, T, K, D] expert outputs of each copy; 0 for copies that were not kept."""
    b, e, c, d = y_BECD.shape
    return jax.vmap(lambda y, s: y.at[s].get(mode="fill", fill_value=0))(
        y_BECD.reshape(b, e * c, d), slot_BTK)


# ----------------------------------------------------------------------------- expert parallelism


def destination_ranks(dest_M: jax.Array, num_devices: int) -> jax.Array:
    """Position of each copy among the copies sent to the same device (token order)."""
    order_M = jnp.argsort(dest_M, stable=True)
    counts_G = jnp.bincount(dest_M, length=num_devices)
    starts_G = jnp.cumsum(counts_G) - counts_G
    sorted_dest_M = dest_M[order_M]
    rank_sorted_M = jnp.arange(dest_M.shape[0]) - starts_G[jnp.minimum(sorted_dest_M, num_devices - 1)]
    return rank_sorted_M[jnp.argsort(order_M)]


def pack_for_devices(x_MD: jax.Array, expert_M: jax.Array, num_devices: int,
                     experts_per_device: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Worst-case send buffers for dropless all-to-all.

    Returns (send_GMD, local_expert_GM, dest_M, rank_M): buffer g holds, at rows 0.., the copies
    bound for device g, and local_expert_GM their expert index on that device (L = empty row).
    Each buffer has room for all M copies, so nothing is ever dropped.
    """
    num_rows, dim = x_MD.shape
    dest_M = expert_M // experts_per_device  # G for invalid copies (expert E): not sent
    rank_M = destination_ranks(dest_M, num_devices)
    send_GMD = jnp.zeros((num_devices, num_rows, dim), x_MD.dtype).at[dest_M, rank_M].add(
        x_MD, mode="drop")
    local_GM = jnp.full((num_devices, num_rows), experts_per_device, jnp.int32).at[dest_M, rank_M].set(
        (expert_M % experts_per_device).astype(jnp.int32), mode="drop")
    return send_GMD, local_GM, dest_M, rank_M
