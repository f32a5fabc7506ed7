"""The dry run's compiled per-device memory: XLA's argument bytes equal the state's and the batch's
shard bytes counted from their shapes, and the CLI prints the figure."""

import jax
import numpy as np

from gqlm.presets import tiny_cpu_experiment
from gqlm.train import compiled_memory as cm
from gqlm.train.experiment import build_experiment
from gqlm.train.tasks.lm import LMTask
from test_cli import run_cli


def shard_bytes(tree):
    """Bytes one device holds of each leaf, from its shape and sharding alone."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
    return total


def test_arguments_are_the_state_and_batch_shards_and_temporaries_grow_with_the_batch():
    config = tiny_cpu_experiment()
    config.mesh.data, config.data.seq_len = 8, 64
    sizes = {}
    for batch_size in (16, 64):
        config.data.batch_size = batch_size
        task = LMTask(with_tokenizer=False)
        exp = build_experiment(config, task)
        batch = task.abstract_batch(exp)
        assert {k: v.shape for k, v in batch.items()} == {k: (batch_size, 64) for k in batch}
        memory = cm.compiled_memory(task.train_step(exp), exp.abstract, batch)
        assert memory.arguments == shard_bytes(exp.abstract) + shard_bytes(batch)
        assert memory.aliased > 0.9 * shard_bytes(exp.abstract)  # the donated state is updated in place
        assert memory.peak == memory.arguments + memory.outputs - memory.aliased + memory.temporaries
        sizes[batch_size] = memory.temporaries
    assert sizes[64] > 2 * sizes[16]  # activations scale with the rows per device


def test_the_dry_run_prints_the_compiled_memory():
    result = run_cli("gqlm.train", "--config", "experiments/tiny_cpu.py:smoke", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiled train step per device (XLA:cpu): peak" in result.stdout
