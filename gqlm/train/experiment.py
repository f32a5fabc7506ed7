"""Everything a config determines before any data is read: mesh, tokenizer, model, optimizer, shardings.

Shared by training, evaluation and sampling, so all three see the same model and layout. What is
built (the LM, the GQ-VAE tokenizer model) is the task's (tasks/); the entry point picks the task.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gqlm import config as config_lib
from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict, ConfigError
from gqlm.interop import hf_config
from gqlm.mesh import make_mesh
from gqlm.optim.factory import make_optimizer
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.base import Tokenizer
from gqlm.train import state as state_lib
from gqlm.train.step import make_eval_step, make_train_step


class Experiment(NamedTuple):
    config: ConfigDict  # with model.vocab_size resolved
    mesh: Mesh
    tokenizer: Tokenizer | None  # None for the GQ-VAE tokenizer model, which reads bytes
    model: state_lib.Model
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: Any  # the train state's tree of NamedSharding
    abstract: Any  # the train state's ShapeDtypeStructs, with shardings

    @property
    def token_bytes(self) -> jax.Array:
        """UTF-8 bytes of each token id (zeros without a tokenizer: a dry run compiles the same
        step shapes without reading the tokenizer's files)."""
        padded = jnp.zeros((self.config.model.vocab_size,), jnp.float32)
        if self.tokenizer is None:
            return padded
        table = self.tokenizer.token_bytes()
        return padded.at[: len(table)].set(jnp.asarray(table, jnp.float32))


class Builder(Protocol):
    """What `build_experiment` needs of a task (tasks/base.py Task)."""

    def build(self, config: ConfigDict, mesh: Mesh) -> Experiment: ...


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


def build_experiment(config: ConfigDict, task: Builder) -> Experiment:
    """Validates the config and builds the task's abstract experiment; nothing large is allocated."""
    config_lib.validate(config, jax.device_count())
    enable_compile_cache(config.train)
    return task.build(config, make_mesh(config.mesh))


def build_lm(config: ConfigDict, mesh: Mesh, with_tokenizer: bool = True) -> Experiment:
    """The language model's experiment. `with_tokenizer=False` (a dry run) builds it from an
    explicit model.vocab_size, without reading the tokenizer (which may live on the pod only)."""
    if config.init.from_hf:  # the model's shape is the HF checkpoint's config.json
        config = hf_config.apply_hf_model(config)
        config_lib.validate(config, jax.device_count())
    if not with_tokenizer and config.model.vocab_size > 0:
        tokenizer = None
    else:
        tokenizer = load_tokenizer(config.data.tokenizer)
        config = resolve_vocab(config, tokenizer)
    model = state_lib.build_model(config.model, config.mesh.rules, mesh)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps, model.abstract_params)
    shardings = state_lib.state_shardings(model, tx, mesh)
    abstract = state_lib.abstract_state(model, tx, shardings)
    return Experiment(config, mesh, tokenizer, model, tx, schedule, shardings, abstract)


def jit_train_step(exp: Experiment, donate: bool = True):
    """The LM train step, jitted with its state and batch shardings (state donated)."""
    batch_sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    step = make_train_step(exp.model.graphdef, exp.tx, exp.schedule, exp.config, exp.token_bytes)
    return jax.jit(step, in_shardings=(exp.shardings, batch_sharding), out_shardings=(exp.shardings, None),
                   donate_argnums=0 if donate else ())


def jit_eval_step(exp: Experiment):
    """The LM eval step (summed nats, tokens, bytes), jitted with its param and batch shardings."""
    batch_sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    step = make_eval_step(exp.model.graphdef, exp.token_bytes, rules=exp.config.mesh.rules)
    return jax.jit(step, in_shardings=(exp.shardings.params, batch_sharding))
