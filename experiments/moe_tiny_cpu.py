"""The tiny_cpu demo with mixture-of-experts MLPs, experts spread over 4 of the 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m gqlm.train --config experiments/moe_tiny_cpu.py --workdir /tmp/gqlm_moe_tiny

Same data, sizes and schedule as experiments/tiny_cpu.py; every MLP is 8 experts of width
mlp_dim / 2 with top-2 routing (the dense model's active MLP FLOPs, 4x its MLP parameters),
dropless, on a (data=2, expert=4) mesh. Switch to capacity dispatch with
`--config.model.moe.dispatch=capacity`. Expect a few minutes on 2 CPU cores and a validation
loss a little below tiny_cpu's; `max_load` and `router_entropy` in the logs show the balance.
`get_config("smoke")` is the same experiment shrunk for tests.
"""

from gqlm.presets import tiny_cpu_experiment


def get_config(arg: str = ""):
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (known: smoke)")
    config = tiny_cpu_experiment(arg)
    e = config.model.moe
    e.num_experts = 8
    e.top_k = 2
    e.every = 1
    e.mlp_dim = config.model.mlp_dim // 2
    e.dispatch = "dropless"
    config.mesh.data = 2
    config.mesh.expert = 4
    return config
