"""MoE dispatch: moving token copies to experts, the per-expert SwiGLU, and combining back.

B batch, T length, D model dim, F expert mlp dim, E experts, K experts per token, M token copies
(rows), C capacity per expert (per sequence, or a dropless bucket), G devices on the `expert`
mesh axis, L experts per device (E / G), R rows per expert in a capacity buffer, N = E C slots.

A copy is one (token, slot k) pair. Dropless dispatch groups copies by expert: sorted, for
`ragged_dot` grouped GEMMs (GPU/TPU), or in [E, C] buckets for batched einsums, with doubling
overflow buckets so nothing is dropped (CPU); capacity dispatch writes copies into fixed [E, C] buffers and drops the overflow. Expert
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


# Dense backend: the first bucket holds 1.25x the balanced load per expert.
FIRST_BUCKET_SLACK = 1.25


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


def first_bucket(expected_rows: int, num_experts: int) -> int:
    """Rows per expert of the first bucket: 1.25 x the balanced load, a multiple of 8."""
    return max(8, -(-math.ceil(FIRST_BUCKET_SLACK * expected_rows / num_experts) // 8) * 8)


def swiglu_bucket(x_MD: jax.Array, expert_M: jax.Array, rank_M: jax.Array, w: ExpertWeights,
                  cap: int) -> jax.Array:
    """SwiGLU of the rows with rank < cap, through one [E, cap, D] buffer and batched einsums;
    other rows (and expert id E) give 0."""
    num_rows, dim = x_MD.shape
    num_experts = w.gate_EDF.shape[0]
    keep_M = (expert_M < num_experts) & (rank_M < cap)
    slot_M = jnp.where(keep_M, expert_M * cap + rank_M, num_experts * cap)
    src_N = jnp.full((num_experts * cap,), num_rows, jnp.int32).at[slot_M].set(
        jnp.arange(num_rows, dtype=jnp.int32), mode="drop")
    x_ECD = permute_rows(x_MD, src_N, slot_M).reshape(num_experts, cap, dim)
    y_ECD = swiglu_batched(x_ECD, w)
    return permute_rows(y_ECD.reshape(num_experts * cap, dim), slot_M, src_N)


def swiglu_bucketed(x_MD: jax.Array, expert_M: jax.Array, w: ExpertWeights,
                    expected_rows: int | None = None, cap: int | None = None) -> jax.Array:
    """Expert expert_M[m] applied to row m (0 where expert_M[m] == E), exact, no sort: fast on CPU.

    Each expert's first `cap` rows (1.25 x its balanced share of `expected_rows`, by default all
    M rows) go to an [E, cap, D] buffer: one batched einsum per weight runs every expert, and the
    weights' gradients are plain einsums. Rows past the cap (an unbalanced load) are handled by a
    `lax.cond` that only runs when some exist: the same, recursively, with the cap doubled, until
    it holds every row. So nothing is ever dropped and a balanced load costs ~1.25x the FLOPs of
    its real rows. `expected_rows`: how many of the M rows are real on average (fewer under
    expert parallelism's worst-case buffers).
    """
    num_rows = x_MD.shape[0]
    num_experts = w.gate_EDF.shape[0]
    cap = cap or first_bucket(expected_rows or num_rows, num_experts)
    rank_M, counts_E = expert_ranks(expert_M, num_experts)
    if cap >= num_rows:  # Holds any grouping.
        return swiglu_bucket(x_MD, expert_M, rank_M, w, num_rows)
    y_MD = swiglu_bucket(x_MD, expert_M, rank_M, w, cap)
    rest_M = jnp.where(rank_M < cap, num_experts, expert_M)
    # The overflow branch is rematerialised: differentiating a cond saves every branch's
    # residuals, and this keeps them to its inputs when the branch does not run.
    overflow = jax.checkpoint(lambda x, e, w: swiglu_bucketed(x, e, w, cap=2 * cap))
    return y_MD + jax.lax.cond(jnp.max(counts_E) > cap, overflow,
                               lambda x, e, w: jnp.zeros_like(x), x_MD, rest_M, w)


def grouped_swiglu(x_MD: jax.Array, expert_M: jax.Array, w: ExpertWeights, backend: str,
                   expected_rows: int | None = None) -> jax.Array:
    """Expert expert_M[m] applied to row m (0 where expert_M[m] == E).

    `ragged`: sort by expert, `lax.ragged_dot` grouped GEMMs, unsort. `dense`: `swiglu_bucketed`.
    `expected_rows`: how many rows are real on average when most are empty (dense backend).
    """
    if backend == "dense":
        return swiglu_bucketed(x_MD, expert_M, w, expected_rows)
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
