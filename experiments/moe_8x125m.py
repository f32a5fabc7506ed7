"""8-expert, top-2 MoE with the active parameters (and FLOPs) of dense_125m; a GPU/TPU-slice job.

    python -m gqlm.train --config experiments/moe_8x125m.py --workdir DIR          # e.g. 8+ GPUs / v4-16+
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gqlm.train \
      --config experiments/moe_8x125m.py --workdir /tmp/x --dry_run \
      --config.mesh.data=1 --config.mesh.expert=8                            # layout check anywhere

Same shape, data and schedule as experiments/dense_125m.py (12 x 768, seq 1024, batch 256,
python_stdlib), but every MLP is 8 SwiGLU experts of width 3072 / 2 = 1536 with top-2 routing:
a token runs 2 x 1536 = 3072 MLP columns, as in the dense model, so active non-embedding
parameters match dense_125m to within 0.1% (the routers) while total parameters are ~3.3x.
Experts live on the `expert` mesh axis (8: one expert per device of each expert group); the
batch spans data x expert. Dropless dispatch (`ragged_dot` grouped GEMMs on GPU/TPU); switch
with `--config.model.moe.dispatch=capacity`. The dry run prints ~368M total / ~113M active
non-embedding parameters; train it next to dense_125m and compare validation bpb at equal steps.
"""

from gqlm.presets import dense_experiment


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"unknown variant {arg!r} (moe_8x125m has none; see moe_tiny_cpu for CPU)")
    config = dense_experiment("125m")
    e = config.model.moe
    e.num_experts = 8
    e.top_k = 2
    e.every = 1
    e.mlp_dim = config.model.mlp_dim // e.top_k
    e.dispatch = "dropless"
    e.router_jitter = 0.0
    config.mesh.data = -1
    config.mesh.expert = 8
    return config
