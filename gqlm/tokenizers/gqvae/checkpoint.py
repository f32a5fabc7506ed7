"""Reading a trained GQ-VAE: the runner's workdir (`python -m gqlm.train` on a GQ-VAE experiment).

The checkpoint format is the runner's (orbax, `DIR/checkpoints/<step>`, config saved alongside);
a workdir is a GQ-VAE checkpoint when its saved config has `gqvae.train_tokenizer=True`. The
first driver's format (`DIR/gqvae.json` + `DIR/params`) is still read, so older workdirs work.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from gqlm.config import ConfigDict, ConfigError, base_config, validate_gqvae

LEGACY_MANIFEST = "gqvae.json"
LEGACY_KIND = "gqvae_checkpoint"


class CheckpointError(ConfigError):
    """A path that is not a readable GQ-VAE checkpoint; the message names the path."""


def load_checkpoint(path: str) -> tuple[ConfigDict, nnx.GraphDef, Any]:
    """(gqvae config section, graphdef, params on the host) of a GQ-VAE workdir's newest verified
    checkpoint; CheckpointError (one line, naming the path) otherwise."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} does not exist")
    if os.path.exists(os.path.join(path, LEGACY_MANIFEST)):
        return _load_legacy(path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint (no checkpoints/ written by gqlm.train)")
    from gqlm.train.checkpoint import SavedRun
    from gqlm.train.experiment import build_experiment
    try:
        with SavedRun(path) as run:
            config = run.config()
            if not config.gqvae.train_tokenizer:
                raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint: it is an LM workdir "
                                      "(its config has gqvae.train_tokenizer=False)")
            exp = build_experiment(config)
            with jax.set_mesh(exp.mesh):
                params = jax.device_get(run.state(exp.abstract).params)
    except CheckpointError:
        raise
    except ConfigError as e:
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint: {e} (an unfinished run, or an LM workdir?)"
                              ) from None
    return ml_collections.ConfigDict(exp.config.gqvae.to_dict()), exp.model.graphdef, params


def _load_legacy(path: str) -> tuple[ConfigDict, nnx.GraphDef, Any]:
    """The first driver's `gqvae.json` (kind, format_version 1, gqvae section) + orbax `params`."""
    import orbax.checkpoint as ocp

    from gqlm.tokenizers.gqvae.train import make_model, split_params
    try:
        with open(os.path.join(path, LEGACY_MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint (unreadable {LEGACY_MANIFEST})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != LEGACY_KIND:
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint (kind is not {LEGACY_KIND!r})")
    if manifest.get("format_version") != 1:
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} has format_version "
                              f"{manifest.get('format_version')!r}; this gqlm reads 1")
    cfg = config_from_dict(manifest.get("gqvae", {}), path)
    graphdef, abstract = split_params(nnx.eval_shape(lambda: make_model(cfg)))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(path, "params"), abstract)
    except Exception as e:  # orbax raises many types; any of them means an unusable checkpoint.
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} has unreadable params: {type(e).__name__}") from None
    return cfg, graphdef, params


def config_from_dict(values: dict[str, Any], where: str) -> ConfigDict:
    """A validated `gqvae` section: schema defaults overridden by `values` (unknown keys refused)."""
    cfg = base_config().gqvae
    for key, value in values.items():
        if key not in cfg:
            raise CheckpointError(f"{where!r}: unknown gqvae config key {key!r}")
        cfg[key] = type(cfg[key])(value)
    try:
        validate_gqvae(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{where!r}: {e}") from None
    return ml_collections.ConfigDict(cfg.to_dict())
