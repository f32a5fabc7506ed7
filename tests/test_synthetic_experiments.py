"""experiments/synthetic_tasks.py: the MoE option matches the dense model's active compute, for
every size option and option order, and eval lengths a task cannot have are one-line errors."""

import os

import pytest

from gqlm.config import ConfigError, apply_override_strings, base_config, load_experiment
from gqlm.data import synthetic
from gqlm.models.flops import count_params, flops_per_token
from gqlm.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()
EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_tasks.py")


def model_of(arg):
    config = load_experiment(f"{EXPERIMENT}:{arg}")
    config.model.vocab_size = TOK.vocab_size
    return config


@pytest.mark.parametrize("size", ["", "bench", "smoke"])
def test_moe_option_matches_the_dense_active_parameters_and_flops(size):
    dense = model_of(",".join(filter(None, ("recall", size))))
    for order in (("moe", size), (size, "moe")):  # the option order must not matter
        moe = model_of(",".join(filter(None, ("recall",) + order)))
        e, d = moe.model.moe, dense.model
        assert e.num_experts == 4 and e.top_k == 2
        # Independent count: 4 SwiGLU experts of width F/2 (3 D F/2 weights each), top-2 active,
        # plus a D x E router, in every layer.
        mlp = 3 * d.embed_dim * d.mlp_dim
        dense_n, moe_n = count_params(d), count_params(moe.model)
        assert moe_n["active_non_embedding"] - dense_n["active_non_embedding"] == d.num_layers * d.embed_dim * 4
        assert moe_n["total"] - dense_n["total"] == d.num_layers * (mlp + d.embed_dim * 4)
        seq = dense.data.seq_len
        ratio = flops_per_token(moe.model, seq) / flops_per_token(d, seq)
        assert 1.0 < ratio < 1.01  # the router's D x E is the only extra compute


def test_bench_option_trains_short_and_evaluates_up_to_4L():
    c = model_of("copy,bench,alibi")
    assert c.model.position == "alibi" and c.model.num_layers == 2
    longest = 4 * c.data.synthetic_max_len
    rows = synthetic.length_batches(c, TOK, longest, 1, 0, c.data.batch_size)[0]
    assert rows["loss_mask"].sum(1).min() == longest  # one whole 4L example per row
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        load_experiment(f"{EXPERIMENT}:copy,fast")


def test_lengths_a_task_cannot_have_are_one_line_errors():
    c = base_config()
    c.data.corpus, c.data.seq_len, c.data.batch_size = "synthetic:parity", 32, 8
    c = apply_override_strings(c, {"data.synthetic_min_len": "6", "data.synthetic_max_len": "12",
                            "data.synthetic_parity_k": "3", "data.synthetic_seed": "5"})
    last = int(synthetic.parity_positions(synthetic.Spec.from_config(c.data)).max())
    assert last >= 2
    with pytest.raises(ConfigError, match=f"length {last} is too short for synthetic:parity"):
        synthetic.length_batches(c, TOK, last, 1, 0, 8)
    (batch,) = synthetic.length_batches(c, TOK, last + 1, 1, 0, 8)  # the shortest length with every bit
    assert batch["loss_mask"].sum() > 0
    c.data.corpus = "synthetic:copy"
    with pytest.raises(ConfigError, match="length 0 must be >= 1"):  # 0 used to mean "random lengths"
        synthetic.length_batches(c, TOK, 0, 1, 0, 8)
