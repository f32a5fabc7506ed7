"""The `model` section (dense transformer and its mixture-of-experts layers) and its checks.

The tuples of choices are the ones the model code dispatches on (models/positions.py,
models/attention.py, models/moe.py), so a choice is named once.
"""

from __future__ import annotations

import ml_collections

from gqlm.config.errors import check, check_choice, check_positive

POSITIONS = ("rope", "alibi", "none")
# einsum: plain XLA ops (fastest on CPU); cudnn: jax.nn.dot_product_attention's fused
# flash-attention kernel (GPU, bf16/fp16); xla: that function's reference path;
# auto: cudnn on GPUs when compute_dtype is bfloat16, else einsum.
ATTENTION_IMPLS = ("auto", "einsum", "cudnn", "xla")
DTYPES = ("float32", "bfloat16")
MOE_DISPATCH = ("dropless", "capacity")
MOE_BACKENDS = ("auto", "ragged", "dense")
# What each block keeps for the backward pass (jax.checkpoint_policies): none = everything
# (no recompute), full = only its input, dots_saveable = matmul outputs, dots_with_no_batch_dims_saveable
# = weight matmuls' outputs but not attention's batched dots (whose [B, H, T, S] logits dominate
# at long sequences).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def moe_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_experts=0,  # 0: dense model.
        top_k=2,
        every=1,  # every N-th layer is MoE (layer i where (i + 1) % every == 0).
        layers=(),  # explicit MoE layer indices; overrides `every` when non-empty.
        mlp_dim=0,  # 0: model.mlp_dim.
        shared_expert=False,
        dispatch="dropless",  # MOE_DISPATCH
        capacity_factor=1.25,
        backend="auto",  # MOE_BACKENDS
        router_jitter=0.0,
        lb_loss_weight=0.01,
        z_loss_weight=0.001,
    ))


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        vocab_size=0,  # 0: taken from the tokenizer (rounded up to a multiple of 128).
        embed_dim=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=0,  # 0: same as num_heads (multi-head); fewer: grouped-query attention.
        head_dim=0,  # 0: embed_dim // num_heads.
        mlp_dim=1024,
        max_seq_len=1024,
        position="rope",  # POSITIONS
        rope_theta=10_000.0,
        attention_impl="auto",  # ATTENTION_IMPLS
        tie_embeddings=True,
        norm_eps=1e-6,
        remat="none",  # REMAT_POLICIES
        scan_layers=False,
        param_dtype="float32",
        compute_dtype="float32",
        init_std=0.02,
        moe=moe_defaults(),
    ))


def validate(m: ml_collections.ConfigDict, expert_axis: int) -> None:
    check_positive(m, "model", ("embed_dim", "num_layers", "num_heads", "mlp_dim", "max_seq_len"))
    check_positive(m, "model", ("num_kv_heads", "head_dim"), strict=False)  # 0: the default
    check(m.embed_dim % m.num_heads == 0 or m.head_dim > 0,
          f"model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}")
    head_dim = m.head_dim or m.embed_dim // m.num_heads
    # RoPE rotates pairs (x[i], x[i + K/2]) of each head: an odd head dim fails deep in the model.
    check(m.position != "rope" or head_dim % 2 == 0,
          f"model.position='rope' needs an even head dim, but model.head_dim={m.head_dim} gives {head_dim} "
          f"(model.embed_dim={m.embed_dim} / model.num_heads={m.num_heads} when 0)")
    kv = m.num_kv_heads or m.num_heads
    check(m.num_heads % kv == 0, f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
    check_choice("model.position", m.position, POSITIONS)
    check_choice("model.attention_impl", m.attention_impl, ATTENTION_IMPLS)
    check_choice("model.remat", m.remat, REMAT_POLICIES)
    check(m.attention_impl != "cudnn" or m.compute_dtype == "bfloat16",  # the fused kernel takes 16-bit inputs
          f"model.attention_impl='cudnn' needs model.compute_dtype='bfloat16', not {m.compute_dtype!r}")
    for key in ("param_dtype", "compute_dtype"):
        check_choice(f"model.{key}", m[key], DTYPES)
    if m.moe.num_experts:
        validate_moe(m.moe, m.num_layers, expert_axis)
        check(bool(moe_layer_indices(m)), f"model.moe.every={m.moe.every} makes none of the model.num_layers="
                                          f"{m.num_layers} layers MoE (model.moe.num_experts={m.moe.num_experts})")
    if m.scan_layers:
        moe_layers = set(moe_layer_indices(m))
        check(len({i in moe_layers for i in range(m.num_layers)}) == 1,
              f"model.scan_layers=True needs all layers alike, but only layers {sorted(moe_layers)} of "
              f"{m.num_layers} are MoE (see model.moe.every/layers)")


def validate_moe(e: ml_collections.ConfigDict, num_layers: int, expert_axis: int) -> None:
    check(e.num_experts > 0, f"model.moe.num_experts={e.num_experts} must be >= 0")
    check_positive(e, "model.moe", ("mlp_dim", "router_jitter"), strict=False)  # mlp_dim 0: model.mlp_dim
    check(1 <= e.top_k <= e.num_experts, f"model.moe.top_k={e.top_k} must lie in [1, model.moe.num_experts={e.num_experts}]")
    check(e.num_experts % expert_axis == 0,
          f"model.moe.num_experts={e.num_experts} is not divisible by mesh.expert={expert_axis}")
    check_choice("model.moe.dispatch", e.dispatch, MOE_DISPATCH)
    check(e.capacity_factor > 0, f"model.moe.capacity_factor={e.capacity_factor} must be > 0")
    check_choice("model.moe.backend", e.backend, MOE_BACKENDS)
    check(e.every >= 1, f"model.moe.every={e.every} must be >= 1")
    for i in e.layers:
        check(0 <= i < num_layers, f"model.moe.layers contains {i}, outside the model's {num_layers} layers")


def moe_layer_indices(model: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Indices of the layers whose MLP is a mixture of experts."""
    e = model.moe
    if not e.num_experts:
        return ()
    if e.layers:
        return tuple(sorted(e.layers))
    return tuple(i for i in range(model.num_layers) if (i + 1) % e.every == 0)
