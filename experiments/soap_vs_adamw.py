"""SOAP against AdamW on the tiny byte-level Shakespeare LM: same model, data and token budget.

Only the optimizer of the hidden matrices differs between the two arms. Parameter groups give
the attention and MLP weights (`blocks/N/attn/{q,k,v,o}`, `blocks/N/mlp/{wi_gate,wi_up,wo}`) to
OPT, and everything else (the tied embedding / output head `embed/table`, the norm scales) to
AdamW in both arms. Attention weights are 3-D ([D, H, K] and [H, K, D]); SOAP keeps one Kronecker
factor per dimension for them (merge_dims off). Both arms share b1=0.9, b2=0.95, weight decay
0.1, gradient clipping 1.0, warm-up then cosine decay; the SOAP arm refreshes its eigenbases
every 10 steps.

The argument is `OPT[,lr=LR][,block=N][,smoke]` with OPT in adamw | soap; `block=N` sets
`optimizer.max_precond_block` (SOAP's block-diagonal preconditioner, blocks of N; default off):

    export XLA_FLAGS=--xla_force_host_platform_device_count=8 OPENBLAS_NUM_THREADS=1
    python -m gqlm.train --config experiments/soap_vs_adamw.py:adamw,lr=6e-3 --workdir /tmp/gqlm_adamw
    python -m gqlm.train --config experiments/soap_vs_adamw.py:soap,lr=6e-3 --workdir /tmp/gqlm_soap

OPENBLAS_NUM_THREADS=1 matters on CPU: SOAP's eigh/QR run in OpenBLAS LAPACK, whose default
thread pool thrashes under 8 fake devices (SOAP's first, eigh-only step took minutes); `import
gqlm` sets it unless it is already set.

The learning-rate sweep for both arms is `SWEEP` (lr applies to every group: the AdamW-trained
embeddings and norms move with it in both arms alike), run by `benchmarks/optimizers.py
--part=steps_to_target`. The tuned comparison (every optimizer's best rate bracketed inside its
grid, 3 seeds, two batch sizes, the whole zoo, only the hidden group's rate tuned) is
`benchmarks/optimizer_sweep.py`; its results and what they can and cannot say are in
docs/optimizers.md ("Tuned optimizers"). A 120-step SOAP run took ~3 min on an idle 2-core machine.
`...:soap,smoke` is the same experiment shrunk for tests.
"""

from gqlm.presets import tiny_cpu_experiment

OPTIMIZERS = ("adamw", "soap")
SWEEP = {"adamw": (1.5e-3, 3e-3, 6e-3), "soap": (3e-3, 6e-3, 1.2e-2)}  # each best inside (optimizer_sweep)
HIDDEN_PATTERN = r"^blocks/\d+/(attn|mlp)/"  # matches attn/q, attn/o, mlp/wo, ... not attn_norm/scale


def parse_arg(arg: str) -> tuple[str, float | None, int, bool]:
    """`OPT[,lr=LR][,block=N][,smoke]` -> (optimizer, learning rate or None, block (0: none), smoke);
    ValueError naming the part."""
    name, *options = [part.strip() for part in (arg or "adamw").split(",")]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} must be one of {', '.join(OPTIMIZERS)} (arg {arg!r})")
    lr, block, smoke = None, 0, False
    for option in options:
        key, eq, value = option.partition("=")
        if option == "smoke":
            smoke = True
        elif key in ("lr", "block") and eq:
            try:
                number = float(value) if key == "lr" else int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} is not a number (arg {arg!r})") from None
            if key == "lr":
                lr = number
            else:
                block = number
        else:
            raise ValueError(f"unknown option {option!r} (arg {arg!r}; expected lr=LR, block=N or smoke)")
    return name, lr, block, smoke


def get_config(arg: str = "adamw"):
    name, lr, block, smoke = parse_arg(arg)
    config = tiny_cpu_experiment("smoke" if smoke else "")  # The demo's model, data and mesh.
    o = config.optimizer
    o.name = "adamw"  # embeddings / head and norms, in both arms
    o.learning_rate = 3e-3 if lr is None else lr
    o.max_precond_block = block  # read by the SOAP arm's group only
    o.precondition_frequency = 10
    o.groups = ({"name": "hidden", "pattern": HIDDEN_PATTERN, "optimizer": name, "lr_multiplier": 1.0},)
    if not smoke:  # The token budget: 120 x 32 x 128 bytes.
        o.warmup_steps = 12
        config.train.steps = 120
        config.train.eval_every = 20
        config.train.checkpoint_every = 120
    return config
