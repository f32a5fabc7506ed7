"""PieceRunner: every piece gets its own row's result back, in every batch shape the same, batches
spread over devices as documented; the tokenizer's encodings do not depend on the devices."""

import numpy as np
import pytest

from gqlm.tokenizers.gqvae.piece_runner import POSITIONS, PieceRunner, rows_for
from gqlm.tokenizers.gqvae.pretokenize import BYTE_PAD

MAX_LEN = 16
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)  # padded lengths: pieces of 5 bytes run at 6, and so on
BUCKET_OF = [next(b for b in BUCKETS if b >= n) for n in range(MAX_LEN + 1)]


def fake_segmenter(calls, with_codes):
    """A stand-in for the jitted model: a segment ends at every byte whose value is odd and at the
    piece's last byte; the code there is 1000 * row length + byte value. Records each call."""
    def fn(params, bytes_RL, lengths_R):
        rows, length = bytes_RL.shape
        calls.append((params, length, rows, int((lengths_R > 0).sum())))
        t_L = np.arange(length)
        valid_RL = t_L[None, :] < lengths_R[:, None]
        assert ((bytes_RL == BYTE_PAD) == ~valid_RL).all()  # padding after each piece, empty rows
        ends_RL = valid_RL & ((bytes_RL % 2 == 1) | (t_L[None, :] == lengths_R[:, None] - 1))
        return (ends_RL, 1000 * lengths_R[:, None] + bytes_RL) if with_codes else ends_RL
    return fn


def expected(piece, with_codes):
    ends = [i for i, b in enumerate(piece) if b % 2 == 1 or i == len(piece) - 1]
    return ends, [1000 * len(piece) + piece[i] if with_codes else -1 for i in ends]


@pytest.mark.parametrize("with_codes", [True, False])
def test_every_piece_gets_its_rows_result_in_fixed_shapes(with_codes):
    rng = np.random.default_rng(0)
    # Several full batches for short buckets, a single partial one for others.
    pieces = [rng.bytes(int(n)) for n in rng.choice([1, 2, 5, 7, 12, 16], 700, p=[.3, .3, .2, .1, .05, .05])]
    pieces += [rng.bytes(3) for _ in range(5)]  # bucket 3: one partial batch
    calls = []
    devices = ["dev0", "dev1", "dev2"]
    with PieceRunner(fake_segmenter(calls, with_codes), devices, BUCKET_OF, with_codes) as runner:
        indices = [runner.add(p) for p in pieces]
        results = runner.results()
    assert indices == list(range(len(pieces)))
    assert results == [expected(p, with_codes) for p in pieces]
    per_bucket = {}  # length -> [(device, pieces in the batch)]; calls come from several threads
    for params, length, rows, used in calls:
        assert rows == rows_for(length) == max(1, POSITIONS // length)  # one shape per bucket
        per_bucket.setdefault(length, []).append((params, used))
    for length, batches in per_bucket.items():
        n, full = sum(BUCKET_OF[len(p)] == length for p in pieces), rows_for(length)
        assert sorted(used for _, used in batches) == sorted([full] * (n // full) + [n % full] * (n % full > 0))
        # bucket L's k-th batch runs on device (L + k) mod 3
        assert sorted(d for d, _ in batches) == sorted(devices[(length + k) % 3] for k in range(len(batches)))
    assert len(per_bucket[2]) >= 2 and len(per_bucket[16]) >= 3 and len(per_bucket[3]) == 1


def test_a_runner_with_no_pieces_runs_nothing():
    calls = []
    with PieceRunner(fake_segmenter(calls, True), ["dev0"], BUCKET_OF, True) as runner:
        assert runner.results() == []
    assert calls == []


def test_model_errors_reach_the_caller():
    def broken(params, bytes_RL, lengths_R):
        raise RuntimeError("model failed")
    with PieceRunner(broken, ["dev0"], BUCKET_OF, False) as runner:
        runner.add(b"abc")
        with pytest.raises(RuntimeError, match="model failed"):
            runner.results()


@pytest.mark.parametrize("threaded", [True, False])
def test_unthreaded_runner_gives_the_same_results(threaded):
    pieces = [bytes([65 + i % 7] * (1 + i % 9)) for i in range(300)]
    with PieceRunner(fake_segmenter([], False), ["dev0"], BUCKET_OF, False, threaded=threaded) as runner:
        for p in pieces:
            runner.add(p)
        assert runner.results() == [expected(p, False) for p in pieces]


def test_fixed_cuts_are_the_fixed_gate_models_cuts():
    """Encoding's NumPy cuts for fixed gates against the model's hard_boundaries(fixed_gates)."""
    from gqlm.tokenizers.gqvae.model import fixed_gates, hard_boundaries
    from gqlm.tokenizers.gqvae.segmenter import fixed_cuts as _fixed_cuts
    lengths_R = np.arange(0, 17, dtype=np.int32)  # an empty row too
    for max_token_len in (4, 10):
        for every in range(1, max_token_len + 1):
            want = np.asarray(hard_boundaries(fixed_gates(lengths_R, 16, every), lengths_R, max_token_len))
            got = _fixed_cuts(None, np.zeros((17, 16), np.int32), lengths_R, every)
            np.testing.assert_array_equal(got, want, err_msg=f"every={every}, max_token_len={max_token_len}")


def test_tokenizer_encodings_do_not_depend_on_the_devices():
    """The tests' 8 fake CPU devices: a tiny model's segmentation of many pieces (several batches
    per bucket) spread over 3 devices equals the one-device segmentation, codes included."""
    import jax
    from gqlm.config import base_config
    from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
    from gqlm.tokenizers.gqvae.model import make_model, split_params
    c = base_config().gqvae
    c.update(dict(embed_dim=8, num_heads=2, encoder_layers=1, gater_layers=1, mlp_dim=16, codebook_size=16,
                  max_token_len=4, max_pretoken_len=8))
    graphdef, params = split_params(make_model(c))
    rng = np.random.default_rng(1)
    words = sorted({"".join(chr(97 + int(x)) for x in rng.integers(0, 26, rng.integers(1, 12))) for _ in range(400)})
    one, many = GQVAETokenizer(c, params, []), GQVAETokenizer(c, params, [])
    one._params_per_device = [jax.device_put(one.params, jax.devices()[0])]
    many._params_per_device = [jax.device_put(many.params, d) for d in jax.devices()[:3]]
    assert one._segment_pretokens(words) == many._segment_pretokens(words)
