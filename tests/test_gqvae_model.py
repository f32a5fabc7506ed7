"""GQ-VAE model pieces against direct NumPy loops: soft mask, hard boundaries, loss, re-seeding,
straight-through gradients, the fixed-gate baseline."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm.config import ConfigError, base_config, validate_gqvae
from gqlm.train.tasks.gqvae.loss import gqvae_loss, soft_mask, windows
from gqlm.tokenizers.gqvae.model import finalize_gates, forward, hard_boundaries, make_model, segment
from gqlm.tokenizers.gqvae.quantizer import reseed_codebook


def tiny_cfg(**overrides):
    q = base_config().gqvae
    q.update(dict(embed_dim=16, num_heads=2, encoder_layers=1, gater_layers=1, mlp_dim=32,
                  codebook_size=32, max_token_len=4, max_pretoken_len=8))
    q.update(overrides)
    return q


def random_batch(seed, b=6, t=8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b).astype(np.int32)
    data = rng.integers(0, 256, (b, t)).astype(np.int32)
    data[np.arange(t)[None, :] >= lengths[:, None]] = 256
    return {"bytes": jnp.asarray(data), "lengths": jnp.asarray(lengths)}


def numpy_soft_mask(g, m):
    b, t = g.shape
    out = np.zeros((b, t, m))
    for bi in range(b):
        for ti in range(t):
            for k in range(m):
                prod = 1.0
                for i in range(1, m - 1 - k + 1):
                    prod *= 1.0 - (g[bi, ti - i] if ti - i >= 0 else 1.0)
                out[bi, ti, k] = prod
    return out


def test_soft_mask_matches_direct_loop():
    g = np.random.default_rng(0).uniform(size=(3, 9)).astype(np.float32)
    for m in (1, 2, 4, 10):
        np.testing.assert_allclose(soft_mask(jnp.asarray(g), m), numpy_soft_mask(g, m), rtol=1e-5, atol=1e-7)


def test_windows_index_the_bytes_ending_at_t():
    x = np.arange(12, dtype=np.int32).reshape(2, 6)
    w = np.asarray(windows(jnp.asarray(x), 3, -1))
    for b in range(2):
        for t in range(6):
            for k in range(3):
                pos = t - (3 - 1 - k)
                assert w[b, t, k] == (x[b, pos] if pos >= 0 else -1)


def numpy_boundaries(g, lengths, m):
    ends = np.zeros(g.shape, bool)
    for b in range(g.shape[0]):
        run = 0
        for t in range(lengths[b]):
            run += 1
            if g[b, t] > 0.5 or run == m or t == lengths[b] - 1:
                ends[b, t] = True
                run = 0
    return ends


def test_hard_boundaries_match_direct_loop():
    rng = np.random.default_rng(1)
    g = (rng.uniform(size=(8, 12)) < 0.2).astype(np.float32) * 0.9  # long runs, so the cap is hit
    lengths = rng.integers(1, 13, 8).astype(np.int32)
    got = np.asarray(hard_boundaries(jnp.asarray(g), jnp.asarray(lengths), 3))
    np.testing.assert_array_equal(got, numpy_boundaries(g, lengths, 3))


@pytest.mark.parametrize("h", [1, 3, 4])
def test_fixed_gate_baseline_cuts_every_h_bytes(h):
    cfg = tiny_cfg(fixed_gate_every=h)
    batch = random_batch(2)
    ends, _ = segment(make_model(cfg), batch["bytes"], batch["lengths"], cfg.max_token_len, h)
    ends, lengths = np.asarray(ends), np.asarray(batch["lengths"])
    for row, n in zip(ends, lengths):
        cuts = np.flatnonzero(row) + 1
        sizes = np.diff(np.concatenate([[0], cuts]))
        assert cuts[-1] == n and not row[n:].any()
        assert (sizes[:-1] == h).all() and 1 <= sizes[-1] <= h


def numpy_loss(out, batch, cfg):
    """The loss formula with explicit loops over positions, from the model's raw outputs."""
    m = cfg.max_token_len
    data, lengths = np.asarray(batch["bytes"]), np.asarray(batch["lengths"])
    g = np.asarray(out["gates"], np.float64)
    logits = np.asarray(out["byte_logits"], np.float64)
    len_logits = np.asarray(out["len_logits"], np.float64)
    z, e = np.asarray(out["z"], np.float64), np.asarray(out["e"], np.float64)
    mask = numpy_soft_mask(g, m)
    rec_num = rec_den = gate = length = commit = 0.0
    n = 0
    for b in range(data.shape[0]):
        for t in range(lengths[b]):
            n += 1
            gate += g[b, t]
            commit += np.sum((z[b, t] - e[b, t]) ** 2)
            bce = 0.0
            for k in range(m):
                pos = t - (m - 1 - k)
                x = len_logits[b, t, k]
                bce += np.log1p(np.exp(-abs(x))) + max(x, 0) - mask[b, t, k] * x
                if pos < 0:
                    continue
                lse = np.log(np.sum(np.exp(logits[b, t, k])))
                rec_num += mask[b, t, k] * (lse - logits[b, t, k, data[b, pos]])
                rec_den += mask[b, t, k]
            length += g[b, t] * bce / m
    return (rec_num / rec_den + cfg.gate_loss_weight * gate / n + length / n
            + (cfg.commit_weight + cfg.codebook_weight) * commit / n)


def test_loss_matches_numpy_reference():
    cfg = tiny_cfg(gate_loss_weight=2.0, commit_weight=0.7, codebook_weight=0.3)
    model, batch = make_model(cfg, seed=3), random_batch(4)
    loss, _ = gqvae_loss(model, batch, True, cfg)
    out = forward(model, batch["bytes"], batch["lengths"], True)
    np.testing.assert_allclose(float(loss), numpy_loss(out, batch, cfg), rtol=2e-5)


def test_gates_are_one_at_the_last_byte_and_zero_after():
    batch = random_batch(5)
    out = forward(make_model(tiny_cfg()), batch["bytes"], batch["lengths"], True)
    g, lengths = np.asarray(out["gates"]), np.asarray(batch["lengths"])
    for row, n in zip(g, lengths):
        assert row[n - 1] == 1.0 and (row[n:] == 0).all() and (row[: n - 1] < 1).all()


def test_straight_through_gradient_reaches_encoder():
    # No VQ losses: the encoder's only gradient path is through the quantizer's straight-through.
    cfg = tiny_cfg(commit_weight=0.0, codebook_weight=0.0)
    model, batch = make_model(cfg), random_batch(6)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    grads = jax.jit(jax.grad(lambda p: gqvae_loss(nnx.merge(graphdef, p), batch, True, cfg)[0]))(params)
    enc_norm = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(grads["encoder"]))
    assert enc_norm > 1e-4
    # ...and the codes themselves get nothing through it (their own loss is off).
    assert float(jnp.max(jnp.abs(grads["quantizer"]["codebook"]))) == 0.0
    # Straight-through is exact: the gradient w.r.t. z equals the gradient w.r.t. q at q = e.
    out = forward(model, batch["bytes"], batch["lengths"], True)
    z, e = out["z"], out["e"]
    valid = out["valid"]

    def head_loss(q):  # any function of q through the gater and decoder
        g = finalize_gates(jax.nn.sigmoid(model.gater(q, valid)), batch["lengths"])
        return jnp.sum(jnp.square(model.decoder(q)[0]) * g[..., None, None])

    def via_st(zz):
        return head_loss(zz + jax.lax.stop_gradient(e - zz))

    np.testing.assert_allclose(jax.jit(jax.grad(via_st))(z), jax.jit(jax.grad(head_loss))(e), rtol=1e-4, atol=1e-4)


def test_warmup_feeds_unquantized_vectors():
    model, batch = make_model(tiny_cfg()), random_batch(7)
    warm = forward(model, batch["bytes"], batch["lengths"], False)
    cold = forward(model, batch["bytes"], batch["lengths"], True)
    direct = model.decoder(warm["z"])[0]
    np.testing.assert_allclose(warm["byte_logits"], direct, rtol=1e-6)
    np.testing.assert_allclose(cold["byte_logits"], model.decoder(cold["e"])[0], rtol=1e-5, atol=1e-5)


def test_reseed_replaces_exactly_the_unused_codes():
    rng = np.random.default_rng(8)
    codebook = rng.normal(size=(8, 4)).astype(np.float32)
    counts = np.array([3, 0, 1, 0, 0, 7, 2, 0], np.float32)
    recent = rng.normal(size=(20, 4)).astype(np.float32)
    valid = np.arange(20) < 12  # the last 8 rows are padding and must never be used
    new = np.asarray(reseed_codebook(jnp.asarray(codebook), jnp.asarray(counts), jnp.asarray(recent),
                                     jax.random.key(0), jnp.asarray(valid)))
    used = counts > 0
    np.testing.assert_array_equal(new[used], codebook[used])
    picked = []
    for row in new[~used]:
        match = np.flatnonzero((recent == row).all(axis=1))
        assert len(match) == 1 and valid[match[0]]
        picked.append(match[0])
    assert len(set(picked)) == len(picked)  # distinct rows where there are enough


def test_params_carry_logical_axes():
    model = make_model(tiny_cfg())
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.get_value().ndim, path


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="gqvae.num_heads=3"):
        validate_gqvae(tiny_cfg(num_heads=3))
    with pytest.raises(ConfigError, match="gqvae.fixed_gate_every=5"):
        validate_gqvae(tiny_cfg(fixed_gate_every=5))
    with pytest.raises(ConfigError, match="gqvae.codebook_size=0"):
        validate_gqvae(tiny_cfg(codebook_size=0))
    validate_gqvae(base_config().gqvae)


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", float("inf"), "gqvae.learning_rate=inf must be finite"),
    ("commit_weight", float("inf"), "gqvae.commit_weight=inf must be finite"),
    ("gate_target_weight", float("inf"), "gqvae.gate_target_weight=inf must be finite"),
    ("gate_target_len", 0.5, "gqvae.gate_target_len=0.5 must be 0 .off. or at least 1"),
    ("gate_target_len", float("inf"), "gqvae.gate_target_len=inf must be finite"),
])
def test_config_refuses_unreachable_or_infinite_values(key, value, message):
    # inf rates/weights made every loss inf/NaN from step 1 (rc 0); mean(g) <= 1 cannot reach 1/0.5 = 2.
    with pytest.raises(ConfigError, match=message):
        validate_gqvae(tiny_cfg(**{key: value}))
    validate_gqvae(tiny_cfg(gate_target_len=1.0))  # the bounds themselves are fine
    validate_gqvae(tiny_cfg(gate_target_len=0.0))


def test_saved_sections_are_not_coerced_into_another_model():
    from gqlm.config.gqvae import from_dict
    # bool("no") is True and int(32.7) is 32: a foreign value must be refused, not silently coerced.
    for values, culprit in (({"train_tokenizer": "no"}, "gqvae.train_tokenizer='no'"),
                            ({"codebook_size": 32.7}, "gqvae.codebook_size=32.7"),
                            ({"embed_dim": [16]}, "gqvae.embed_dim=[16]"),
                            ({"learning_rate": True}, "gqvae.learning_rate=True"),
                            ([1, 2], "not a mapping"), ("x", "not a mapping")):
        with pytest.raises(ConfigError, match=re.escape(culprit)) as info:
            from_dict(values, "/some/dir")
        assert "/some/dir" in str(info.value) and "\n" not in str(info.value)
    q = from_dict({"codebook_size": 64.0, "gate_target_len": 3}, "/some/dir")  # lossless conversions
    assert (q.codebook_size, type(q.codebook_size), q.gate_target_len, type(q.gate_target_len)) == (64, int, 3.0, float)
