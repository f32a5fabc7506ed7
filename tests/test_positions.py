"""RoPE and ALiBi against independent NumPy / closed-form references."""

import jax.numpy as jnp
import numpy as np
import pytest

from gqlm.models import positions


def numpy_rope(x_BTHK: np.ndarray, positions_BT: np.ndarray, theta: float) -> np.ndarray:
    """Explicit 2x2 rotation of each pair (x[i], x[i + K/2]) by pos * theta^(-2i/K)."""
    B, T, H, K = x_BTHK.shape
    out = np.zeros_like(x_BTHK, dtype=np.float64)
    for b in range(B):
        for t in range(T):
            for i in range(K // 2):
                angle = positions_BT[b, t] * theta ** (-2.0 * i / K)
                rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
                for h in range(H):
                    pair = np.array([x_BTHK[b, t, h, i], x_BTHK[b, t, h, i + K // 2]])
                    out[b, t, h, i], out[b, t, h, i + K // 2] = rot @ pair
    return out


def test_rope_matches_numpy_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 0, 1], [3, 7, 11, 100, 2]], np.int32)
    got = positions.apply_rope(jnp.asarray(x), jnp.asarray(pos), 500.0)
    np.testing.assert_allclose(np.asarray(got), numpy_rope(x, pos, 500.0), atol=2e-5, rtol=1e-5)


def test_rope_position_zero_is_identity_and_dtype_kept():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 2, 4)), jnp.bfloat16)
    got = positions.apply_rope(x, jnp.zeros((1, 3), jnp.int32), 10_000.0)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x, np.float32))


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m: int, n: int) -> float:
        qm = positions.apply_rope(q, jnp.full((1, 1), m, jnp.int32), 10_000.0)
        kn = positions.apply_rope(k, jnp.full((1, 1), n, jnp.int32), 10_000.0)
        return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head dim"):
        positions.rope_inv_frequencies(7, 10_000.0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_alibi_slopes_power_of_two_closed_form(n):
    # Press et al.: geometric sequence starting at 2^(-8/n) with that same ratio.
    ratio = 2.0 ** (-8.0 / n)
    expected = [ratio ** h for h in range(1, n + 1)]
    np.testing.assert_allclose(positions.alibi_slopes(n), expected, rtol=1e-6)


def test_alibi_slopes_non_power_of_two():
    # n=6: the 4 slopes of n=4, then slopes 1 and 3 (every other) of n=8.
    expected = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    np.testing.assert_allclose(positions.alibi_slopes(6), expected, rtol=1e-6)


def test_alibi_bias_matches_loops():
    pos = np.array([[0, 1, 2, 0, 1, 2, 3]], np.int32)
    slopes = positions.alibi_slopes(4)
    got = np.asarray(positions.alibi_bias(4, jnp.asarray(pos)))
    assert got.shape == (1, 4, 7, 7)
    for h in range(4):
        for t in range(7):
            for s in range(7):
                assert got[0, h, t, s] == pytest.approx(-slopes[h] * (pos[0, t] - pos[0, s]))
