"""Synthetic tasks (gqlm/data/synthetic.py): `--config experiments/synthetic_tasks.py:TASK[,OPTION...]`.

TASK: copy | recall | parity | addition. OPTIONS: rope | alibi | none (positions, default rope),
moe (4 experts, top-2, every layer), smoke (seconds-long, for tests).

    python -m gqlm.train --config experiments/synthetic_tasks.py:copy,alibi --workdir /tmp/copy_alibi
    python -m gqlm.eval.synthetic_eval --workdir /tmp/copy_alibi --lengths 4,8,16,32

Trains on lengths 1..8 (byte tokenizer, d128 x 4, 8-way data parallel on CPU); the eval reports
exact-match accuracy at the train length and 2x / 4x beyond it (length generalization). Expect
copy to reach ~100% at lengths <= 8 within the 1,000 steps (a few minutes on 2 CPU cores);
what happens at 16 and 32 is the experiment (RoPE vs ALiBi vs NoPE).
"""

from gqlm.config import SYNTHETIC_TASKS
from gqlm.presets import tiny_cpu_experiment


def get_config(arg: str = "copy"):
    task, *options = arg.split(",")
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}")
    config = tiny_cpu_experiment()  # The demo's model, byte tokenizer, rows, batch and mesh.
    config.data.corpus = f"synthetic:{task}"
    config.data.synthetic_min_len = 3 if task == "parity" else 1
    config.data.synthetic_max_len = {"recall": 6, "parity": 12}.get(task, 8)
    config.data.synthetic_parity_k = 3
    config.model.max_seq_len = 1024  # eval rows grow with the tested length
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.0
    config.train.steps = 1000
    config.train.log_every = 20
    config.train.eval_every = 250
    config.train.eval_batches = 2
    config.train.checkpoint_every = 250
    config.train.sample_tokens = 0
    for option in options:
        if option in ("rope", "alibi", "none"):
            config.model.position = option
        elif option == "moe":
            config.model.moe.num_experts, config.model.moe.top_k = 4, 2
        elif option == "smoke":  # the same code path in seconds
            config.model.num_layers, config.model.embed_dim, config.model.num_heads = 2, 64, 4
            config.model.num_kv_heads, config.model.mlp_dim = 4, 256
            config.data.seq_len, config.data.batch_size = 64, 16
            config.train.steps, config.train.eval_every, config.train.checkpoint_every = 20, 10, 10
            config.optimizer.warmup_steps = 2
            config.train.progress = False
        else:
            raise ValueError(f"unknown option {option!r} (known: rope, alibi, none, moe, smoke)")
    return config
