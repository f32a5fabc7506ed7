"""Training FLOPs per token against a count made here from the parameter shapes; MFU arithmetic in
`Throughput` on a fake clock; the datasheet peak table on the device_kind strings jax reports.

Convention (the one gqlm/models/flops.py documents; PaLM's, Chowdhery et al. 2022 App. B, with
a causal discount): training costs 3x the forward pass, and the forward pass costs per token
- 2 FLOPs per weight of every matmul the token goes through: q, k, v, o, the MLP (for an MoE
  layer, the router plus top_k of the num_experts experts), and the output head (D x V, also when
  tied to the embedding; the embedding lookup itself is no matmul);
- 2 x 2 x H K FLOPs per key it attends to, for q.k and p.v, per layer; a causal token attends to
  T / 2 keys on average, so 2 H K T per layer. PaLM counts T keys (12 L H K T for training); a
  causal kernel skips the masked half, so gqlm counts only the FLOPs the model needs;
- 2 per RMSNorm scale: no matmul, but inside Kaplan et al.'s "non-embedding parameters" N that the
  6N term uses; under 0.02% of the total here, and asserted so.
"""

import math
import types

import jax
import pytest
from flax import nnx

from gqlm.config import load_experiment
from gqlm.models.flops import count_params, flops_per_token
from gqlm.models.transformer import Transformer
from gqlm.train import metrics

EXPERIMENTS = ("experiments/dense_125m.py", "experiments/moe_8x125m.py")
BYTE_VOCAB = 384  # the byte tokenizer's 259 ids rounded up to 128, as build_lm resolves it
ATTENTION = ("q", "k", "v", "o")
MLP = ("wi_gate", "wi_up", "wo")


def model_config(experiment, vocab):
    config = load_experiment(experiment)
    config.model.vocab_size = vocab
    return config.model, config.data.seq_len


def param_shapes(cfg):
    """{path: shape} of the model's parameters, from eval_shape (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return {tuple(str(p) for p in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def forward_flops_from_shapes(cfg, seq_len):
    """(matmul FLOPs, norm-scale FLOPs) of one token's forward pass, by parameter name."""
    shapes = param_shapes(cfg)
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    matmul = norms = 0
    for path, shape in shapes.items():
        name, size = path[-1], math.prod(shape)
        if name in ATTENTION or name == "router":
            matmul += 2 * size
        elif name in MLP:
            expert = len(shape) == 3  # [E, in, out]: the token runs top_k of the E experts
            assert expert == (E > 0) and (not expert or shape[0] == E), (path, shape)
            matmul += 2 * size * k // E if expert else 2 * size
        elif name == "scale":
            norms += 2 * size
        else:
            assert path in (("embed", "table"), ("unembed",)), path
    V, D = cfg.vocab_size, cfg.embed_dim
    matmul += 2 * D * V  # the head: its own kernel, or the tied embedding
    for layer in range(cfg.num_layers):
        q = shapes[("blocks", str(layer), "attn", "q")]  # [D, H, K]
        matmul += 2 * q[1] * q[2] * seq_len  # q.k and p.v over T / 2 keys on average
    return matmul, norms


@pytest.mark.parametrize("vocab", [BYTE_VOCAB, 50304])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_flops_per_token_matches_a_count_from_the_parameter_shapes(experiment, vocab):
    cfg, seq_len = model_config(experiment, vocab)
    matmul, norms = forward_flops_from_shapes(cfg, seq_len)
    assert norms < 2e-4 * matmul
    assert flops_per_token(cfg, seq_len) == 3 * (matmul + norms)


def closed_form_flops(D, L, H, K, F, V, T, experts=0, top_k=0):
    """The same convention in closed form, from the shape numbers of the experiment's docstring."""
    attention = 4 * D * H * K  # q, k, v, o (no grouped-query attention in these two)
    mlp = top_k * 3 * D * F + D * experts if experts else 3 * D * F  # active experts + router
    return 6 * (L * (attention + mlp + 2 * D) + D) + 6 * L * T * H * K + 6 * D * V


def test_dense_125m_and_moe_8x125m_in_closed_form():
    dense, seq_len = model_config(EXPERIMENTS[0], BYTE_VOCAB)
    moe, _ = model_config(EXPERIMENTS[1], BYTE_VOCAB)
    want_dense = closed_form_flops(768, 12, 12, 64, 3072, BYTE_VOCAB, 1024)
    want_moe = closed_form_flops(768, 12, 12, 64, 1536, BYTE_VOCAB, 1024, experts=8, top_k=2)
    assert seq_len == 1024 and flops_per_token(dense, seq_len) == want_dense
    assert flops_per_token(moe, seq_len) == want_moe
    # 8 top-2 experts of half width: the dense model's FLOPs plus the routers' (6 D E per layer).
    assert want_moe - want_dense == 6 * 12 * 768 * 8
    # ~113M active non-embedding parameters in both (the MoE file's docstring), 368M in all for the MoE.
    assert count_params(dense)["active_non_embedding"] == 12 * (4 * 768 * 768 + 3 * 768 * 3072 + 2 * 768) + 768
    moe_counts = count_params(moe)
    assert moe_counts["active_non_embedding"] == count_params(dense)["active_non_embedding"] + 12 * 768 * 8
    assert moe_counts["non_embedding"] == 12 * (4 * 768 * 768 + 8 * 3 * 768 * 1536 + 768 * 8 + 2 * 768) + 768


# ----------------------------------------------------------------------------- Throughput and MFU


class FakeClock:
    def __init__(self, now=100.0):
        self.now = now

    def perf_counter(self):
        return self.now


def slow_batches(clock, wait_s):
    """An endless iterator whose every batch takes `wait_s` of (fake) time to arrive."""
    while True:
        clock.now += wait_s
        yield {"inputs": None}


def test_throughput_reports_tokens_per_second_mfu_and_data_wait(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    tokens, fpt, peak = 4096, 1.5e9, 2e12
    meter = metrics.Throughput(tokens, fpt, peak)
    batches = slow_batches(clock, 0.25)
    assert meter(0) == {}  # the first call only starts the clock
    for _ in range(4):  # 4 steps of 2 s each: 0.25 s waiting for data, 1.75 s computing
        meter.next_batch(batches)
        clock.now += 1.75
    got = meter(4)
    assert got["step_time_s"] == pytest.approx(2.0)
    assert got["tokens_per_s"] == pytest.approx(tokens / 2.0)
    assert got["data_wait_fraction"] == pytest.approx(1.0 / 8.0)
    # MFU = achieved model FLOP/s over the peak of every device (8 fake devices here).
    assert jax.device_count() == 8
    assert got["mfu"] == pytest.approx(tokens / 2.0 * fpt / (8 * peak))
    # The window restarts at each call: 2 steps of 1 s without any data wait.
    clock.now += 2.0
    got = meter(6)
    assert got["step_time_s"] == pytest.approx(1.0) and got["data_wait_fraction"] == 0.0
    assert got["mfu"] == pytest.approx(tokens * fpt / (8 * peak))
    assert meter(6) == {}  # no step since the last call: nothing to report


def test_throughput_without_a_peak_reports_no_mfu(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    meter = metrics.Throughput(100, 1e6, None)
    meter(0)
    clock.now += 5.0
    got = meter(10)
    assert "mfu" not in got and got["tokens_per_s"] == pytest.approx(200.0)


# ----------------------------------------------------------------------------- the datasheet table

DEVICE_KINDS = {  # device_kind as jax reports it -> dense bf16 FLOP/s (vendor datasheets)
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40S": 362e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


@pytest.mark.parametrize("kind", list(DEVICE_KINDS))
def test_datasheet_peak_of_each_device_kind(kind):
    assert metrics.datasheet_peak_flops(kind) == DEVICE_KINDS[kind]


def test_unknown_devices_have_no_datasheet_peak():
    for kind in ("cpu", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", ""):
        assert metrics.datasheet_peak_flops(kind) is None


def test_more_specific_keys_win_whatever_the_table_order(monkeypatch):
    reordered = dict(reversed(list(metrics.PEAK_FLOPS.items())))
    monkeypatch.setattr(metrics, "PEAK_FLOPS", reordered)
    for kind, peak in DEVICE_KINDS.items():
        assert metrics.datasheet_peak_flops(kind) == peak, kind


def fake_devices(kind, platform):
    return lambda *args: [types.SimpleNamespace(device_kind=kind, platform=platform)] * 8


def test_device_peak_flops_override_then_datasheet_then_measured(monkeypatch):
    assert metrics.device_peak_flops(123e12) == 123e12
    monkeypatch.setattr(metrics.jax, "devices", fake_devices("NVIDIA H100 PCIe", "gpu"))
    assert metrics.device_peak_flops() == 756e12
    monkeypatch.setattr(metrics.jax, "devices", fake_devices("NVIDIA GeForce RTX 4090", "gpu"))
    assert metrics.device_peak_flops() is None  # an unknown GPU: no guess, no MFU
    # A CPU: a matmul measured over all devices, per device.
    monkeypatch.setattr(metrics.jax, "devices", fake_devices("cpu", "cpu"))
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda **kw: 8e10)
    assert metrics.device_peak_flops() == pytest.approx(1e10)
