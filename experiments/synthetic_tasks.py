"""Synthetic tasks (gqlm/data/synthetic.py): `--config experiments/synthetic_tasks.py:TASK[,OPTION...]`.

TASK: copy | recall | parity | addition | phonebook. OPTIONS: rope | alibi | none (positions, default rope),
moe (4 experts of width mlp_dim / 2, top-2, every layer: the dense MLP's active parameters and
FLOPs per token, twice its MLP parameters), bench (the d128 x 2 model of
benchmarks/synthetic_tasks.py, minutes per run), smoke (seconds-long, for tests).

    python -m gqlm.train --config experiments/synthetic_tasks.py:copy,alibi --workdir /tmp/copy_alibi
    python -m gqlm.eval.synthetic_eval --workdir /tmp/copy_alibi --lengths 4,8,16,32

Trains on lengths 1..8 (byte tokenizer, d128 x 4, 8-way data parallel on CPU); the eval reports
exact-match accuracy at the train length and 2x / 4x beyond it (length generalization). Expect
copy to reach ~100% at lengths <= 8 within the 1,000 steps (a few minutes on 2 CPU cores);
what happens at 16 and 32 is the experiment (RoPE vs ALiBi vs NoPE).

`bench` (benchmarks/synthetic_tasks.py, 2-4 minutes per run on the loaded 2-core CPU): copy
reaches 99-100% exact match at L = 8 in 500 steps (NoPE 79%); recall (L = 4) and addition (L = 4)
stay near chance at 500 / 800 steps: they need more compute than that budget. phonebook
(a fixed book of 2,000 names -> 4-digit numbers, 2,000 steps, ~6-10 minutes): the dense model
memorizes part of the book; its MoE twin's numbers are in benchmarks/results/synthetic_tasks.json.
"""

from gqlm.config import SYNTHETIC_TASKS
from gqlm.presets import tiny_cpu_experiment

OPTIONS = ("rope", "alibi", "none", "moe", "bench", "smoke")
# bench: per task, the train length L (lengths 1..L) and the steps that the d128 x 2 model gets
# within benchmarks/synthetic_tasks.py's budget (~35 minutes for 7 runs on a loaded 2-core CPU).
BENCH = {"copy": (8, 500), "recall": (4, 500), "parity": (12, 800), "addition": (4, 800), "phonebook": (4, 2000)}
# phonebook under bench: a fixed book of this many 4-digit numbers (~160 sightings per entry in 2,000 steps).
# A 1,000-entry book at 1,500 steps was memorized almost whole (dense 97%, MoE 99.6%): too easy to compare.
BENCH_PHONEBOOK_SIZE = 2000


def get_config(arg: str = "copy"):
    task, *options = arg.split(",")
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}")
    config = tiny_cpu_experiment()  # The demo's model, byte tokenizer, rows, batch and mesh.
    config.data.corpus = f"synthetic:{task}"
    config.data.synthetic_min_len = {"parity": 3, "phonebook": 4}.get(task, 1)
    config.data.synthetic_max_len = {"recall": 6, "parity": 12, "phonebook": 4}.get(task, 8)
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
        elif option == "bench":  # 2 layers suffice for copy (an induction head); rows of 64 tokens.
            config.model.num_layers = 2
            config.data.seq_len, config.data.batch_size = 64, 32
            config.data.synthetic_max_len, steps = BENCH[task]
            if task == "phonebook":  # one bucket: every number has L digits
                config.data.synthetic_min_len = config.data.synthetic_max_len
                config.data.synthetic_phonebook_size = BENCH_PHONEBOOK_SIZE
            config.train.steps = config.train.eval_every = config.train.checkpoint_every = steps
            config.train.log_every = 100
            config.train.progress = False
        elif option == "smoke":  # the same code path in seconds
            config.model.num_layers, config.model.embed_dim, config.model.num_heads = 2, 64, 4
            config.model.num_kv_heads, config.model.mlp_dim = 4, 256
            config.data.seq_len, config.data.batch_size = 64, 16
            config.train.steps, config.train.eval_every, config.train.checkpoint_every = 20, 10, 10
            config.optimizer.warmup_steps = 2
            config.train.progress = False
        else:
            raise ValueError(f"unknown option {option!r} (known: {', '.join(OPTIONS)})")
    if config.model.moe.num_experts:  # after every option: matched to the final dense width
        e = config.model.moe
        e.mlp_dim = config.model.mlp_dim // e.top_k
    return config
