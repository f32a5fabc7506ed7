"""The decoder LM: packing and causality invariants, dtypes, remat, scan, MoE hook, counts."""

import contextlib
import io
import math
import re
import sys
import types

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigError, base_config
from gqlm.config import model as model_config
from gqlm.models import flops
from gqlm.models.layers import logical_param
from gqlm.models.transformer import Transformer

V, D, L, H, G, F = 40, 32, 2, 4, 2, 48

# One row holding three documents (lengths 4, 3, 5) then 2 padding tokens.
DOCS = [(0, 4), (4, 7), (7, 12)]
SEG = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 0, 0]], np.int32)
POS = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1]], np.int32)


def tiny_cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, embed_dim=D, num_layers=L, num_heads=H, num_kv_heads=G, mlp_dim=F,
                    max_seq_len=64, init_std=0.1))
    cfg.update(overrides)
    return cfg


def tokens(seed: int, shape=SEG.shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=shape).astype(np.int32)


@jax.jit(static_argnums=0)
def _apply(graphdef, params, ids, pos, seg):
    return nnx.merge(graphdef, params)(ids, pos, seg)


def forward(model, ids, pos=POS, seg=SEG):
    logits, aux = _apply(*nnx.split(model), jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
    return np.asarray(logits), aux


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_packing_isolates_documents_and_matches_running_alone(position):
    model = Transformer(tiny_cfg(position=position), rngs=nnx.Rngs(0))
    ids = tokens(1)
    logits, aux = forward(model, ids)
    assert logits.dtype == np.float32 and logits.shape == (1, SEG.shape[1], V) and aux == {}

    # Changing document 2 changes its own logits and leaves documents 1 and 3 untouched.
    changed = ids.copy()
    changed[0, 4:7] = (changed[0, 4:7] + 1) % V
    logits2, _ = forward(model, changed)
    np.testing.assert_array_equal(logits2[0, :4], logits[0, :4])
    np.testing.assert_array_equal(logits2[0, 7:12], logits[0, 7:12])
    assert np.abs(logits2[0, 4:7] - logits[0, 4:7]).max() > 1e-3

    # Each document alone (positions from 0, then padding) gives the same logits as packed.
    for start, end in DOCS:
        n = end - start
        alone = np.zeros_like(ids)
        alone[0, :n] = ids[0, start:end]
        seg = np.where(np.arange(SEG.shape[1]) < n, 1, 0)[None].astype(np.int32)
        pos = np.where(seg == 1, np.arange(SEG.shape[1])[None], 0).astype(np.int32)
        logits_alone, _ = forward(model, alone, pos, seg)
        np.testing.assert_allclose(logits_alone[0, :n], logits[0, start:end], atol=1e-5, rtol=1e-5)


def test_causality_later_tokens_never_change_earlier_logits():
    model = Transformer(tiny_cfg(), rngs=nnx.Rngs(1))
    T = 10
    ids = tokens(2, (2, T))
    pos = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    seg = np.ones((2, T), np.int32)
    logits, _ = forward(model, ids, pos, seg)
    for t in (3, 7):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 5) % V
        logits2, _ = forward(model, changed, pos, seg)
        np.testing.assert_array_equal(logits2[:, :t], logits[:, :t])
        assert np.abs(logits2[:, t:] - logits[:, t:]).max() > 1e-3


def test_tied_and_untied_shapes():
    tied = nnx.to_pure_dict(nnx.state(Transformer(tiny_cfg(), rngs=nnx.Rngs(0))))
    untied_model = Transformer(tiny_cfg(tie_embeddings=False), rngs=nnx.Rngs(0))
    untied = nnx.to_pure_dict(nnx.state(untied_model))
    assert "unembed" not in tied and tied["embed"]["table"].shape == (V, D)
    assert untied["unembed"].shape == (D, V)
    logits, _ = forward(untied_model, tokens(3))
    assert logits.shape == (1, SEG.shape[1], V)
    # The untied head really is used: zeroing it zeroes the logits.
    untied_model.unembed[...] = jnp.zeros((D, V))
    np.testing.assert_array_equal(forward(untied_model, tokens(3))[0], 0.0)


def test_bf16_compute_close_to_fp32():
    model32 = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    model16 = Transformer(tiny_cfg(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    ids = tokens(4)
    logits32, _ = forward(model32, ids)
    logits16, _ = forward(model16, ids)
    assert logits16.dtype == np.float32
    assert not np.array_equal(logits16, logits32)  # bf16 really ran
    np.testing.assert_allclose(logits16, logits32, atol=3e-2 * np.abs(logits32).max())


def test_bf16_params_are_stored_in_bf16():
    model = Transformer(tiny_cfg(param_dtype="bfloat16", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits, _ = forward(model, tokens(5))
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))


@jax.jit(static_argnums=0)
def _loss_and_grads(graphdef, params, ids):
    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(ids, jnp.asarray(POS), jnp.asarray(SEG))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.value_and_grad(loss)(params)


def loss_and_grads(model, ids):
    return _loss_and_grads(*nnx.split(model), jnp.asarray(ids))


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_same_output_and_grads(policy):
    ids = tokens(6)
    base = loss_and_grads(Transformer(tiny_cfg(), rngs=nnx.Rngs(0)), ids)
    remat = loss_and_grads(Transformer(tiny_cfg(remat=policy), rngs=nnx.Rngs(0)), ids)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), base, remat)


def test_remat_policies_save_less_in_the_documented_order():
    """none keeps every residual, dots_saveable the matmul outputs, the no-batch-dims policy drops
    attention's batched dots too, full only each block's input: bytes saved for the backward pass."""
    ids, pos, seg = jnp.asarray(tokens(6)), jnp.asarray(POS), jnp.asarray(SEG)

    def saved_bytes(policy):
        graphdef, state = nnx.split(Transformer(tiny_cfg(remat=policy), rngs=nnx.Rngs(0)))
        loss = lambda state: nnx.merge(graphdef, state)(ids, pos, seg)[0].sum()  # noqa: E731
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            jax.ad_checkpoint.print_saved_residuals(loss, state)
        shapes = re.findall(r"^f32\[([\d,]+)\]", printed.getvalue(), re.M)  # one line per residual
        return 4 * sum(math.prod(int(n) for n in shape.split(",")) for shape in shapes)
    sizes = [saved_bytes(p) for p in ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes


def stack_blocks(pure: dict) -> dict:
    """Unrolled params {blocks: {0: tree, 1: tree}} -> scanned {blocks: tree of [L, ...]}."""
    out = dict(pure)
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["blocks"][i] for i in range(L)])
    return out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_layers_equals_unrolled_given_same_weights(remat):
    unrolled = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    scanned = Transformer(tiny_cfg(scan_layers=True, remat=remat), rngs=nnx.Rngs(1))
    graphdef, scanned_state = nnx.split(scanned)
    stacked = stack_blocks(nnx.to_pure_dict(nnx.state(unrolled)))
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, nnx.to_pure_dict(scanned_state))
    scanned = nnx.merge(graphdef, stacked)
    ids = tokens(7)
    np.testing.assert_allclose(forward(scanned, ids)[0], forward(unrolled, ids)[0], atol=1e-5, rtol=1e-5)
    loss_u, grads_u = loss_and_grads(unrolled, ids)
    loss_s, grads_s = loss_and_grads(scanned, ids)
    assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 stack_blocks(nnx.to_pure_dict(grads_u)), nnx.to_pure_dict(grads_s))


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True}, {"tie_embeddings": False}])
def test_every_param_has_logical_names_of_its_rank(overrides):
    abstract = nnx.eval_shape(lambda: Transformer(tiny_cfg(**overrides), rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    assert len(flat) > 0
    for path, variable in flat:
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.get_value().ndim, (path, names)
        assert set(names) <= {"embed", "mlp", "heads", "kv_heads", "kv", "vocab", "layers", "norm"}
        assert (names[0] == "layers") == bool(overrides.get("scan_layers")) or "blocks" not in path


def test_sharded_forward_matches_single_device():
    cfg = tiny_cfg(tie_embeddings=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = np.tile(tokens(8), (4, 1))
    want, _ = forward(model, ids, np.tile(POS, (4, 1)), np.tile(SEG, (4, 1)))
    mesh_cfg = base_config().mesh
    mesh_cfg.update(dict(data=2, fsdp=2, tensor=2))
    mesh = mesh_lib.make_mesh(mesh_cfg)
    graphdef, state = nnx.split(model)
    shardings = mesh_lib.param_shardings(state, mesh_cfg.rules, mesh)
    params = jax.device_put(nnx.to_pure_dict(state), shardings)
    assert params["blocks"][0]["mlp"]["wi_up"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    batch = mesh_lib.batch_sharding(mesh, mesh_cfg.rules)
    with jax.set_mesh(mesh):
        got, _ = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(
            params, *(jax.device_put(jnp.asarray(a), batch) for a in (ids, np.tile(POS, (4, 1)),
                                                                       np.tile(SEG, (4, 1)))))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- MoE hook


class FakeMoeMLP(nnx.Module):
    """Stands in for gqlm.models.moe.MoeMLP: per-expert weights, aux scalars that depend on x."""

    def __init__(self, cfg, *, rngs):
        E, Fe = cfg.moe.num_experts, cfg.moe.mlp_dim or cfg.mlp_dim
        self.router = logical_param(jnp.zeros((cfg.embed_dim, E)), ("embed", "expert"))
        self.wi = logical_param(0.1 * jax.random.normal(rngs.params(), (E, cfg.embed_dim, Fe)),
                                ("expert", "embed", "expert_mlp"))
        self.wo = logical_param(jnp.zeros((E, Fe, cfg.embed_dim)), ("expert", "expert_mlp", "embed"))

    def __call__(self, x_BTD, segment_ids_BT):
        h = jnp.einsum("btd,df->btf", x_BTD, self.wi[0])
        mask = (segment_ids_BT > 0).astype(jnp.float32)
        return jnp.einsum("btf,fd->btd", h, self.wo[0]), {
            "lb_loss": jnp.sum(mask * jnp.mean(h ** 2, axis=-1)), "z_loss": jnp.mean(x_BTD)}


@pytest.fixture
def fake_moe(monkeypatch):
    monkeypatch.setitem(sys.modules, "gqlm.models.moe", types.SimpleNamespace(MoeMLP=FakeMoeMLP))


def moe_cfg(**overrides):
    cfg = tiny_cfg(num_layers=4, **overrides)
    cfg.moe.update(dict(num_experts=4, top_k=1, every=2, mlp_dim=8))
    return cfg


def test_moe_layers_and_aux_are_summed_and_kept_per_layer(fake_moe):
    model = Transformer(moe_cfg(), rngs=nnx.Rngs(0))
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "FakeMoeMLP", "Mlp", "FakeMoeMLP"]
    _, aux = forward(model, tokens(9))
    assert set(aux) == {"lb_loss", "z_loss", "layer_1/lb_loss", "layer_1/z_loss",
                        "layer_3/lb_loss", "layer_3/z_loss"}
    for key in ("lb_loss", "z_loss"):
        assert float(aux[key]) == pytest.approx(float(aux[f"layer_1/{key}"] + aux[f"layer_3/{key}"]), rel=1e-6)
    assert float(aux["layer_1/lb_loss"]) != pytest.approx(float(aux["layer_3/lb_loss"]))


def test_moe_scan_needs_uniform_layers():
    with pytest.raises(ConfigError, match="model.scan_layers"):
        model_config.validate(moe_cfg(scan_layers=True), expert_axis=1)


def test_moe_all_layers_scanned_keeps_per_layer_aux(fake_moe):
    cfg = moe_cfg(scan_layers=True)
    cfg.moe.every = 1
    scanned = Transformer(cfg, rngs=nnx.Rngs(0))
    cfg.scan_layers = False
    unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(scanned)
    pure = nnx.to_pure_dict(nnx.state(unrolled))
    pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["blocks"][i] for i in range(4)])
    _, aux_s = forward(nnx.merge(graphdef, pure), tokens(10))
    _, aux_u = forward(unrolled, tokens(10))
    assert set(aux_s) == set(aux_u) and len(aux_u) == 2 + 2 * 4
    for key in aux_u:
        assert float(aux_s[key]) == pytest.approx(float(aux_u[key]), rel=1e-5), key


# ----------------------------------------------------------------------------- counts and flops


def hand_count(cfg, head_dim):
    attn = D * H * head_dim + 2 * D * G * head_dim + H * head_dim * D
    dense = attn + 3 * D * F + 2 * D  # + two norm scales
    return dense * L + D  # + final norm


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("head_dim", [0, 12])
def test_count_params_matches_hand_count(tie, head_dim):
    cfg = tiny_cfg(tie_embeddings=tie, head_dim=head_dim)
    counts = flops.count_params(cfg)
    non_embedding = hand_count(cfg, head_dim or D // H)
    embedding = V * D * (1 if tie else 2)
    assert counts == {"total": non_embedding + embedding, "embedding": embedding,
                      "non_embedding": non_embedding, "active_non_embedding": non_embedding}


def test_count_params_moe_active_fraction(fake_moe):
    cfg = moe_cfg()
    counts = flops.count_params(cfg)
    E, Fe = 4, 8
    expert = 2 * E * D * Fe  # per MoE layer: wi + wo
    router = D * E
    attn = D * H * 8 + 2 * D * G * 8 + H * 8 * D
    dense_layer = attn + 3 * D * F + 2 * D
    moe_layer = attn + expert + router + 2 * D
    assert counts["non_embedding"] == 2 * dense_layer + 2 * moe_layer + D
    assert counts["active_non_embedding"] == counts["non_embedding"] - 2 * expert * (E - 1) // E


def test_flops_per_token_formula():
    cfg = tiny_cfg(tie_embeddings=False)
    T = 24
    n = hand_count(cfg, D // H)
    assert flops.flops_per_token(cfg, T) == 6 * n + 6 * L * T * (H * (D // H)) + 6 * D * V


def test_unresolved_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Transformer(tiny_cfg(vocab_size=0), rngs=nnx.Rngs(0))
