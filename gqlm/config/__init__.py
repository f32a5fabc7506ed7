"""The one config schema, split by section, each section beside its checks.

An experiment file defines `get_config(arg: str | None = None) -> ConfigDict`, starting from
`base_config()` and changing only what it needs. The returned dict is locked, so an override of
a key that does not exist is an error rather than a silent no-op. `validate` checks a config
before anything is compiled: every check is written once, in its section's module.
"""

from __future__ import annotations

import ml_collections

from gqlm.config import data, gqvae, init, mesh, model, optimizer, train
from gqlm.config.data import PHONEBOOK_NAMES, SYNTHETIC_TASKS  # noqa: F401  (re-exported)
from gqlm.config.errors import ConfigError, check
from gqlm.config.files import (apply_override_strings, apply_overrides, check_override_keys,  # noqa: F401
                               load_experiment, load_python_file, parse_overrides, to_tuples)
from gqlm.config.mesh import DEFAULT_RULES, MESH_AXES, resolve_mesh_shape  # noqa: F401
from gqlm.config.model import moe_layer_indices  # noqa: F401

ConfigDict = ml_collections.ConfigDict
validate_gqvae = gqvae.validate


def base_config() -> ConfigDict:
    """Every key gqlm reads, with its default. Experiments override a subset."""
    c = ConfigDict()
    c.seed = 0
    c.model = model.defaults()
    c.data = data.defaults()
    c.optimizer = optimizer.defaults()
    c.train = train.defaults()
    c.mesh = mesh.defaults()
    c.gqvae = gqvae.defaults()  # the GQ-VAE tokenizer model, trained separately from the LM
    c.init = init.defaults()  # initial LM parameters: random, or a HF checkpoint
    return c


def validate(config: ConfigDict, num_devices: int) -> None:
    """Checks everything that can be checked before a compile; raises ConfigError."""
    sizes = resolve_mesh_shape(config.mesh, num_devices)
    mesh.check_rules(config.mesh.rules)
    model.validate(config.model, sizes["expert"])
    data.validate(config.data, config.model.max_seq_len)
    train.validate(config.train)
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    d, t = config.data, config.train
    check(d.batch_size % (batch_shards * t.grad_accum) == 0,
          f"data.batch_size={d.batch_size} is not divisible by the data-parallel size "
          f"{batch_shards} x train.grad_accum={t.grad_accum}")
    optimizer.validate(config.optimizer)
    gqvae.validate(config.gqvae)
    init.validate(config.init)


# Values an older gqlm saved that now have another spelling: {dotted key: {old: new}}.
LEGACY_VALUES = {"model.remat": {False: "none", True: "full"}}  # remat was a bool before its policies


def config_from_dict(saved: dict) -> ConfigDict:
    """Rebuilds a config saved as JSON (lists back to tuples, defaults for keys added since, old
    spellings of values updated)."""
    config = base_config()

    def fill(node: ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                continue  # a key this version no longer reads
            if isinstance(node[key], ConfigDict):
                fill(node[key], value, f"{prefix}{key}.")
            else:
                renamed = LEGACY_VALUES.get(prefix + key, {})
                node[key] = to_tuples(renamed.get(value, value) if isinstance(value, bool) else value)

    fill(config, saved, "")
    config.lock()
    return config
