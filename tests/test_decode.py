"""KV-cache generation (gqlm/models/decode.py) against the full forward re-run on the growing sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm import mesh as mesh_lib
from gqlm.config import base_config
from gqlm.models import decode
from gqlm.models.transformer import Transformer

V, N = 48, 7
PROMPTS = [[1, 5, 7, 9, 3, 11], [2, 8], [4, 4, 40, 4], [30]]


def model_cfg(position="rope", moe=False, **overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    max_seq_len=64, init_std=0.5, position=position))
    if moe:
        cfg.moe.update(dict(num_experts=4, top_k=2, mlp_dim=16, backend="dense"))
    cfg.update(overrides)
    return cfg


def split_model(cfg):
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))


@jax.jit(static_argnums=0)
def _last_logits(graphdef, params, ids_BT, lengths_B):
    """Full-forward logits at each row's last real token (padding after it, as segment 0)."""
    B, T = ids_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    segment_ids_BT = (positions_BT < lengths_B[:, None]).astype(jnp.int32)
    logits_BTV, _ = nnx.merge(graphdef, params)(ids_BT, positions_BT, segment_ids_BT)
    return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


def greedy_without_cache(graphdef, params, prompts, num_tokens, vocab_limit=V):
    """Greedy decoding that re-runs the whole (growing) sequence for every new token, over the
    first `vocab_limit` ids."""
    ids_BT, lengths_B = decode.pad_prompts(prompts, 0)
    ids_BT = np.pad(ids_BT, ((0, 0), (0, num_tokens)))
    out = []
    for _ in range(num_tokens):
        logits_BV = _last_logits(graphdef, params, ids_BT, lengths_B)[:, :vocab_limit]
        token_B = np.asarray(jnp.argmax(logits_BV, axis=-1))
        ids_BT[np.arange(len(prompts)), lengths_B] = token_B
        lengths_B = lengths_B + 1
        out.append(token_B)
    return np.stack(out, axis=1)


def greedy(graphdef, params, prompts=PROMPTS, **kw):
    return np.asarray(decode.generate(graphdef, params, prompts, jax.random.key(0), num_tokens=N, **kw))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_greedy_matches_the_full_forward_token_for_token(position, moe):
    graphdef, params = split_model(model_cfg(position, moe))
    want = greedy_without_cache(graphdef, params, PROMPTS, N)
    assert len({tuple(r) for r in want}) > 1 and len(set(want.ravel())) > 3  # not a degenerate model
    np.testing.assert_array_equal(greedy(graphdef, params), want)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_scan_layers_generates_what_unrolled_layers_do(moe):
    graphdef, params = split_model(model_cfg("rope", moe, scan_layers=True))
    np.testing.assert_array_equal(greedy(graphdef, params), greedy_without_cache(graphdef, params, PROMPTS, N))


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_prefill_and_step_logits_match_the_full_forward(position):
    graphdef, params = split_model(model_cfg(position, init_std=0.1))
    prompts_BP, lengths_B = decode.pad_prompts(PROMPTS, 0)
    cache, logits_BV = decode.prefill(graphdef, params, prompts_BP, lengths_B, num_slots=prompts_BP.shape[1] + 1)
    np.testing.assert_allclose(logits_BV, _last_logits(graphdef, params, prompts_BP, lengths_B), rtol=1e-5, atol=1e-5)

    token_B = np.asarray([3, 17, 29, 41], np.int32)  # one step on tokens of our choosing
    positions_B1 = lengths_B[:, None]
    step_B1V, _, _ = nnx.merge(graphdef, params).cached(jnp.asarray(token_B[:, None]), positions_B1,
                                                        jnp.ones_like(positions_B1), *cache)
    grown_BT = np.pad(prompts_BP, ((0, 0), (0, 1)))
    grown_BT[np.arange(4), lengths_B] = token_B
    want_BV = _last_logits(graphdef, params, grown_BT, lengths_B + 1)
    np.testing.assert_allclose(step_B1V[:, 0], want_BV, rtol=1e-5, atol=1e-5)


def test_stop_tokens_end_rows_and_then_pad():
    graphdef, params = split_model(model_cfg())
    free = greedy(graphdef, params)
    stops = (int(free[0, 1]), int(free[2, 3]))
    got = greedy(graphdef, params, stop_ids=stops, pad_id=47)
    for row_free, row_got in zip(free, got):
        hits = [i for i, t in enumerate(row_free) if t in stops]
        end = hits[0] + 1 if hits else N
        np.testing.assert_array_equal(row_got[:end], row_free[:end])  # the stop token is kept
        assert (row_got[end:] == 47).all()
    # Every row stops at its first token: the loop ends at once, the rest is padding.
    got = greedy(graphdef, params, stop_ids=tuple(int(t) for t in free[:, 0]), pad_id=47)
    np.testing.assert_array_equal(got[:, 0], free[:, 0])
    assert (got[:, 1:] == 47).all()


def test_sampling_top_k_one_is_greedy_and_seeds_repeat():
    graphdef, params = split_model(model_cfg())
    np.testing.assert_array_equal(greedy(graphdef, params, temperature=0.7, top_k=1), greedy(graphdef, params))
    a, b = (greedy(graphdef, params, temperature=1.5, top_k=5) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < V)).all()


def test_top_k_of_the_vocabulary_or_more_is_plain_sampling():
    """k >= V keeps every id (lax.top_k refused k > V): the draw is the untruncated tempered softmax's."""
    logits_BV = jax.random.normal(jax.random.key(1), (3, V))
    key = jax.random.key(2)
    want = jax.random.categorical(key, logits_BV / 0.7, axis=-1)
    for k in (V, V + 1, 10 * V):
        np.testing.assert_array_equal(decode.next_token(logits_BV, key, 0.7, k), want)
    graphdef, params = split_model(model_cfg())
    np.testing.assert_array_equal(greedy(graphdef, params, temperature=1.5, top_k=10 * V),
                                  greedy(graphdef, params, temperature=1.5, top_k=0))


def test_vocab_limit_keeps_padding_ids_out_of_greedy_and_sampled_output():
    """The embedding is padded past the tokenizer's vocabulary: with vocab_limit those ids are
    never emitted, and greedy equals the full forward's argmax over the real ids."""
    graphdef, params = split_model(model_cfg())
    limit = int(greedy(graphdef, params).max())  # the unlimited output holds an id >= limit
    got = greedy(graphdef, params, vocab_limit=limit)
    np.testing.assert_array_equal(got, greedy_without_cache(graphdef, params, PROMPTS, N, vocab_limit=limit))
    def sampled(**kw):
        return np.concatenate([decode.generate(graphdef, params, PROMPTS, jax.random.key(seed), num_tokens=N,
                                               temperature=3.0, **kw) for seed in range(3)])
    assert sampled(vocab_limit=limit).max() < limit
    assert sampled().max() >= limit  # without the limit such ids do appear


def test_empty_prompts_are_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        decode.pad_prompts([[1], []], 0)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=2, tensor=2)], ids=["data8", "data2_fsdp2_tensor2"])
def test_sharded_generation_matches_one_device(axes, moe):
    cfg = model_cfg("rope", moe)
    graphdef, state = split_model(cfg)
    want = greedy(graphdef, state)
    mesh_cfg = base_config().mesh
    mesh_cfg.update({**dict(data=1, fsdp=1, tensor=1, expert=1), **axes})
    mesh = mesh_lib.make_mesh(mesh_cfg)
    prompts = PROMPTS * 2  # B = 8 rows: the batch splits over every data-parallel device
    with jax.set_mesh(mesh):
        params = jax.device_put(nnx.to_pure_dict(state), mesh_lib.param_shardings(state, mesh_cfg.rules, mesh))
        np.testing.assert_array_equal(greedy(graphdef, params, prompts), np.concatenate([want, want]))
        prompts_BP, lengths_B = decode.pad_prompts(prompts, 0)
        cache, _ = decode.prefill(graphdef, params, prompts_BP, lengths_B, num_slots=10, rules=mesh_cfg.rules)
    batch_axes = ("data",) if "fsdp" not in axes else ("data", "fsdp")
    spec = tuple(cache.k_LBGSK[0].sharding.spec) + (None,) * 4  # layer 0's [B, G, S, K]
    assert spec[0] in (batch_axes, batch_axes[0]) and (spec[1] == "tensor") == ("tensor" in axes), spec
