"""Everything a config determines before any data is read: mesh, tokenizer, model, optimizer, shardings.

Shared by training, evaluation and sampling, so all three see the same model and layout.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gqlm import config as config_lib
from gqlm.config import ConfigDict, ConfigError
from gqlm import mesh as mesh_lib
from gqlm.mesh import make_mesh
from gqlm.optim.factory import make_optimizer
from gqlm.tokenizers.base import Tokenizer, load_tokenizer
from gqlm.train import state as state_lib


class Experiment(NamedTuple):
    config: ConfigDict  # with model.vocab_size resolved
    mesh: Mesh
    tokenizer: Tokenizer
    model: state_lib.Model
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: state_lib.TrainState
    abstract: state_lib.TrainState  # ShapeDtypeStructs with shardings
    task: Any = None  # gqlm.train.task.Task: what the runner trains (LM or GQ-VAE)

    @property
    def token_bytes(self) -> jax.Array:
        table = self.tokenizer.token_bytes()
        padded = jnp.zeros((self.config.model.vocab_size,), jnp.float32)
        return padded.at[: len(table)].set(jnp.asarray(table, jnp.float32))


def enable_compile_cache(train_cfg: ConfigDict) -> None:
    if train_cfg.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(train_cfg.compile_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def resolve_vocab(config: ConfigDict, tokenizer: Tokenizer) -> ConfigDict:
    """Sets model.vocab_size from the tokenizer (rounded up to 128 so it shards evenly)."""
    config = config.copy_and_resolve_references()
    if config.model.vocab_size == 0:
        config.model.vocab_size = -(-tokenizer.vocab_size // 128) * 128
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ({config.data.tokenizer})")
    config.lock()
    return config


def build_experiment(config: ConfigDict, task: Any = None) -> Experiment:
    """Validates the config and builds the abstract experiment of its task (default: the one the
    config names, gqlm.train.task.task_for); nothing large is allocated."""
    from gqlm.train.task import task_for  # task.py builds experiments with this module
    config_lib.validate(config, jax.device_count())
    enable_compile_cache(config.train)
    mesh = make_mesh(config.mesh)
    return (task or task_for(config)).build(config, mesh)


def build_lm(config: ConfigDict, mesh: Mesh, task: Any) -> Experiment:
    """The language model's experiment (LMTask.build)."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    config = resolve_vocab(config, tokenizer)
    model = state_lib.build_model(config.model, config.mesh.rules, mesh)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps, model.abstract_params)
    shardings = state_lib.state_shardings(model, tx, mesh)
    abstract = state_lib.abstract_state(model, tx, shardings)
    return Experiment(config, mesh, tokenizer, model, tx, schedule, shardings, abstract, task)


def dry_run_report(exp: Experiment) -> str:
    """Parameter count, FLOPs/token, per-device memory and every parameter's sharding."""
    memory = state_lib.describe(exp.abstract)
    model_lines, optimizer = exp.task.describe(exp)
    lines = [
        f"mesh: {dict(exp.mesh.shape)} ({jax.device_count()} devices, {jax.devices()[0].platform})",
        *model_lines,
        f"per-device memory: params {memory['param_bytes_per_device'] / 2**20:,.1f} MiB, "
        f"optimizer state {memory['opt_bytes_per_device'] / 2**20:,.1f} MiB "
        f"({optimizer})",
        "parameter shardings:",
    ]
    for name, shape, spec in state_lib.param_sharding_table(exp.model):
        lines.append(f"  {name:<48} {str(shape):<22} {spec}")
    return "\n".join(lines)


def restore_trained(workdir: str, overrides: dict[str, str] | None = None,
                    step: int | None = None) -> tuple[Experiment, int, state_lib.TrainState]:
    """The experiment saved in a training workdir and its checkpointed state (any mesh)."""
    from gqlm.train.checkpoint import SavedRun  # checkpoint imports this module's deps
    with SavedRun(workdir, step) as run:
        exp = build_experiment(config_lib.apply_overrides(run.config(), overrides or {}))
        with jax.set_mesh(exp.mesh):
            return exp, run.step, run.state(exp.abstract)


def jit_train_step(exp: Experiment, donate: bool = True):
    """The experiment's train step, jitted with its state and batch shardings (state donated)."""
    from gqlm.train.step import make_train_step
    batch_sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    step = make_train_step(exp.model.graphdef, exp.tx, exp.schedule, exp.config, exp.token_bytes)
    return jax.jit(step, in_shardings=(exp.shardings, batch_sharding), out_shardings=(exp.shardings, None),
                   donate_argnums=0 if donate else ())


def jit_eval_step(exp: Experiment):
    """The experiment's eval step (summed nats, tokens, bytes), jitted with its param and batch shardings."""
    from gqlm.train.step import make_eval_step
    batch_sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    step = make_eval_step(exp.model.graphdef, exp.token_bytes, rules=exp.config.mesh.rules)
    return jax.jit(step, in_shardings=(exp.shardings.params, batch_sharding))
