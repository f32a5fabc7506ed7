"""MoE dispatch: moving token copies to experts, the per-expert SwiGLU, and combining back.

B batch, T length, D model dim, F expert mlp dim, E experts, K experts per token, M token copies
(rows), S rows of the blocked layout, C capacity per expert (per sequence), G devices on the `expert`
mesh axis, L experts per device (E / G), R rows per expert in a capacity buffer, N = E C slots,
Q blocks of P rows (one expert's copies each).

A copy is one (token, slot k) pair. Dropless dispatch groups copies by expert: sorted, for
`ragged_dot` grouped GEMMs (GPU/TPU), or (CPU, where ragged_dot runs at ~1/8 of matmul speed)
into blocks of P rows, one expert's each, run by a loop over the used blocks only (S rows of room
for the worst case), so the cost follows the real rows whatever the balance;
capacity dispatch writes copies into fixed [E, C] buffers and drops the overflow. Expert
id E (one past the last) marks a copy that no expert processes (padding or dropped): its output
is 0. Every function here works on one device's arrays; `moe.py` wires them into `shard_map`.
"""

from __future__ import annotations

import functools
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


@jax.custom_vjp
def permute_rows(x_MD: jax.Array, src_N: jax.Array, dst_M: jax.Array) -> jax.Array:
    """y[n] = x[src[n]] (0 where src[n] is out of range), for a partial bijection: dst[src[n]] = n.

    The gradient is the inverse gather dx[m] = dy[dst[m]], not a scatter-add (slow on CPU).
    """
    return x_MD.at[src_N].get(mode="fill", fill_value=0)


def _permute_fwd(x_MD, src_N, dst_M):
    return permute_rows(x_MD, src_N, dst_M), (src_N, dst_M)


def _permute_bwd(res, dy_ND):
    src_N, dst_M = res
    return dy_ND.at[dst_M].get(mode="fill", fill_value=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def expert_ranks(expert_M: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(rank_M, counts_E): each copy's position among its expert's copies (row order), and the
    copies per expert. Copies with expert id E count nowhere."""
    onehot_ME = jax.nn.one_hot(expert_M, num_experts, dtype=jnp.int32)
    rank_M = jnp.sum((jnp.cumsum(onehot_ME, axis=0) - 1) * onehot_ME, axis=-1)
    return rank_M, jnp.sum(onehot_ME, axis=0)


BLOCKS_PER_EXPERT = 4  # dense backend: blocks of ~1/4 of the balanced load per expert


def block_rows(expected_rows: int, num_experts: int) -> int:
    """Rows per block: a quarter of the balanced load per expert, a multiple of 8 in [8, 256].

    Each expert wastes under one block of padding, so ~E x block / 2 = 12.5% of the rows on
    average; smaller blocks make smaller (slower) matmuls and more loop steps."""
    rows = -(-expected_rows // (BLOCKS_PER_EXPERT * num_experts))
    return min(256, max(8, -(-rows // 8) * 8))


class BlockLayout(NamedTuple):
    """Copies sorted by expert into blocks of `block` rows; each expert's copies start a new block."""
    position_M: jax.Array  # row of copy m in the blocked layout; -1 for expert id E
    block_end_E: jax.Array  # one past the last block of each expert (cumulative block counts)
    block: int


def block_layout(expert_M: jax.Array, num_experts: int, block: int) -> BlockLayout:
    rank_M, counts_E = expert_ranks(expert_M, num_experts)
    blocks_E = -(-counts_E // block)
    block_end_E = jnp.cumsum(blocks_E)
    start_M = (block_end_E - blocks_E)[jnp.minimum(expert_M, num_experts - 1)]
    position_M = jnp.where(expert_M < num_experts, start_M * block + rank_M, -1)
    return BlockLayout(position_M.astype(jnp.int32), block_end_E.astype(jnp.int32), block)


def _block_experts(block_end_E: jax.Array, num_blocks: int) -> jax.Array:
    """Expert of each of `num_blocks` blocks; blocks past the last expert's (unused) get E - 1."""
    ids_Q = jnp.arange(num_blocks, dtype=jnp.int32)
    return jnp.minimum(jnp.sum(ids_Q[:, None] >= block_end_E[None, :], axis=1),
                       block_end_E.shape[0] - 1).astype(jnp.int32)


def _blocks_forward(x_SD, expert_Q, used, w, block, save):
    """Loop over the `used` blocks: block q's rows times its expert's weights (a dynamic index,
    no weight copy per block); with `save`, also the pre-activations for the backward pass."""
    num_rows, dim = x_SD.shape
    hidden = w.gate_EDF.shape[-1]
    zeros_SF = jnp.zeros((num_rows, hidden) if save else (0, hidden), x_SD.dtype)

    def body(q, carry):
        y_SD, gate_SF, up_SF = carry
        e, row = expert_Q[q], q * block
        x_PD = jax.lax.dynamic_slice_in_dim(x_SD, row, block)
        gate_PF = x_PD @ w.gate_EDF[e]
        up_PF = x_PD @ w.up_EDF[e]
        y_SD = jax.lax.dynamic_update_slice_in_dim(y_SD, (jax.nn.silu(gate_PF) * up_PF) @ w.out_EFD[e], row, 0)
        if save:
            gate_SF = jax.lax.dynamic_update_slice_in_dim(gate_SF, gate_PF, row, 0)
            up_SF = jax.lax.dynamic_update_slice_in_dim(up_SF, up_PF, row, 0)
        return y_SD, gate_SF, up_SF

    return jax.lax.fori_loop(0, used, body, (jnp.zeros_like(x_SD), zeros_SF, zeros_SF))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def swiglu_blocks(x_SD: jax.Array, expert_Q: jax.Array, used: jax.Array, w: ExpertWeights,
                  block: int, save: bool = True) -> jax.Array:
    """SwiGLU of expert expert_Q[q] on rows [q block, (q + 1) block) for the first `used` blocks;
    0 for the rows after them. A `fori_loop` with a traced trip count: the cost follows the used
    blocks, however many the static shapes allow. Hand-written backward (a second loop), since
    reverse-mode AD cannot go through a loop of unknown length; it accumulates the weight
    gradients per block in float32. `save`: keep the [S, F] pre-activations for the backward
    pass; otherwise recompute them per block (for layouts mostly empty, like expert parallelism's
    worst-case buffers, where two [S, F] buffers would cost more than the matmuls they save)."""
    return _blocks_forward(x_SD, expert_Q, used, w, block, save=False)[0]


def _blocks_fwd(x_SD, expert_Q, used, w, block, save):
    y_SD, gate_SF, up_SF = _blocks_forward(x_SD, expert_Q, used, w, block, save=save)
    return y_SD, (x_SD, expert_Q, used, w, gate_SF, up_SF)


def _blocks_bwd(block, save, res, dy_SD):
    x_SD, expert_Q, used, w, gate_SF, up_SF = res
    f32 = jnp.float32

    def body(q, carry):
        dx_SD, dw = carry
        e, row = expert_Q[q], q * block
        x_PD, dy_PD = (jax.lax.dynamic_slice_in_dim(a, row, block) for a in (x_SD, dy_SD))
        if save:
            gate_PF, up_PF = (jax.lax.dynamic_slice_in_dim(a, row, block) for a in (gate_SF, up_SF))
        else:
            gate_PF, up_PF = x_PD @ w.gate_EDF[e], x_PD @ w.up_EDF[e]
        sig_PF = jax.nn.sigmoid(gate_PF)
        silu_PF = gate_PF * sig_PF
        dh_PF = dy_PD @ w.out_EFD[e].T
        dup_PF = dh_PF * silu_PF
        dgate_PF = dh_PF * up_PF * (sig_PF + silu_PF * (1 - sig_PF))
        dx_PD = dgate_PF @ w.gate_EDF[e].T + dup_PF @ w.up_EDF[e].T
        dx_SD = jax.lax.dynamic_update_slice_in_dim(dx_SD, dx_PD, row, 0)
        dw = ExpertWeights(dw.gate_EDF.at[e].add((x_PD.T @ dgate_PF).astype(f32)),
                           dw.up_EDF.at[e].add((x_PD.T @ dup_PF).astype(f32)),
                           dw.out_EFD.at[e].add(((silu_PF * up_PF).T @ dy_PD).astype(f32)))
        return dx_SD, dw

    dw0 = ExpertWeights(*(jnp.zeros(a.shape, f32) for a in w))
    dx_SD, dw = jax.lax.fori_loop(0, used, body, (jnp.zeros_like(x_SD), dw0))
    return dx_SD, None, None, ExpertWeights(*(g.astype(a.dtype) for g, a in zip(dw, w)))


swiglu_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def swiglu_blocked(x_MD: jax.Array, expert_M: jax.Array, w: ExpertWeights,
                   expected_rows: int | None = None, block: int | None = None) -> jax.Array:
    """Expert expert_M[m] applied to row m (0 where expert_M[m] == E), exact: the CPU backend.

    Copies are laid out by expert in blocks of `block` rows (each expert padded to whole blocks)
    and a loop runs the used blocks, one expert's weights each: the cost follows the real rows
    whatever the balance (a collapsed router costs what a balanced one does), plus under one block
    of padding per expert. The buffers have room for every row being real (dropless), but only
    used blocks are computed. `expected_rows`: how many of the M rows are real on average (fewer
    under expert parallelism's worst-case buffers); it sets the block size (`block_rows`).
    """
    num_rows, dim = x_MD.shape
    num_experts = w.gate_EDF.shape[0]
    block = block or block_rows(min(num_rows, expected_rows or num_rows), num_experts)
    layout = block_layout(expert_M, num_experts, block)
    max_blocks = -(-num_rows // block) + num_experts  # every row real, every expert's last block partial
    size = max_blocks * block
    dst_M = jnp.where(layout.position_M >= 0, layout.position_M, size)
    src_S = jnp.full((size,), num_rows, jnp.int32).at[dst_M].set(
        jnp.arange(num_rows, dtype=jnp.int32), mode="drop")
    # Save the pre-activations unless most of the layout is room for a worst case that is not expected.
    save = size <= 2 * (expected_rows or num_rows)
    y_SD = swiglu_blocks(permute_rows(x_MD, src_S, dst_M), _block_experts(layout.block_end_E, max_blocks),
                         layout.block_end_E[-1], w, block, save)
    return permute_rows(y_SD, dst_M, src_S)


def grouped_swiglu(x_MD: jax.Array, expert_M: jax.Array, w: ExpertWeights, backend: str,
                   expected_rows: int | None = None) -> jax.Array:
    """Expert expert_M[m] applied to row m (0 where expert_M[m] == E).

    `ragged`: sort by expert, `lax.ragged_dot` grouped GEMMs, unsort. `dense`: `swiglu_blocked`.
    `expected_rows`: how many rows are real on average when most are empty (dense backend).
    """
    if backend == "dense":
        return swiglu_blocked(x_MD, expert_M, w, expected_rows)
    if backend != "ragged":
        raise ValueError(f"MoE backend {backend!r} must be ragged or dense")
    num_experts = w.gate_EDF.shape[0]
    order_M = jnp.argsort(expert_M, stable=True)
    group_sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
    y_sorted_MD = swiglu_ragged(x_MD[order_M], group_sizes_E, w)
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

    Returns (send_GMD, local_expert_GM, slot_M, src_N): buffer g holds, at rows 0.., the copies
    bound for device g (token order), and local_expert_GM their expert index on that device
    (L = empty row). slot_M = g M + position is where copy m went (G M if not sent) and src_N its
    inverse, for `permute_rows` back. Each buffer has room for all M copies: nothing is dropped.
    """
    num_rows, dim = x_MD.shape
    dest_M = expert_M // experts_per_device  # G for invalid copies (expert E): not sent
    rank_M = destination_ranks(dest_M, num_devices)
    slot_M = jnp.where(dest_M < num_devices, dest_M * num_rows + rank_M, num_devices * num_rows)
    src_N = jnp.full((num_devices * num_rows,), num_rows, jnp.int32).at[slot_M].set(
        jnp.arange(num_rows, dtype=jnp.int32), mode="drop")
    send_GMD = permute_rows(x_MD, src_N, slot_M).reshape(num_devices, num_rows, dim)
    local_GM = jnp.where(src_N < num_rows, expert_M.at[src_N].get(mode="fill", fill_value=0)
                         % experts_per_device, experts_per_device).astype(jnp.int32)
    return send_GMD, local_GM.reshape(num_devices, num_rows), slot_M, src_N
