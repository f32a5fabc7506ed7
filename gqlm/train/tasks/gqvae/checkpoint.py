"""Reading a trained GQ-VAE: the runner's workdir (`python -m gqlm.train` on a GQ-VAE experiment).

The checkpoint format is the runner's (orbax, `DIR/checkpoints/<step>`, config saved alongside);
a workdir is a GQ-VAE checkpoint when its saved config has `gqvae.train_tokenizer=True`. The
first driver's format (`DIR/gqvae.json` + `DIR/params`) is still read, so older workdirs work.
A tokenizer is then built from what this returns: `GQVAETokenizer.build(cfg, params, ...)`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from gqlm.config import ConfigDict, ConfigError
from gqlm.config import gqvae as gqvae_config
from gqlm.tokenizers.gqvae.model import abstract_model
from gqlm.train.checkpoint import restore_trained
from gqlm.train.tasks.gqvae.task import GQVAETask

LEGACY_MANIFEST = "gqvae.json"
LEGACY_KIND = "gqvae_checkpoint"


class CheckpointError(ConfigError):
    """A path that is not a readable GQ-VAE checkpoint; the message names the path."""


def load_checkpoint(path: str) -> tuple[ConfigDict, Any]:
    """(gqvae config section, params on the host) of a GQ-VAE workdir's newest verified
    checkpoint; CheckpointError (one line, naming the path) otherwise."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} does not exist")
    if os.path.exists(os.path.join(path, LEGACY_MANIFEST)):
        return _load_legacy(path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint (no checkpoints/ written by gqlm.train)")

    def require_gqvae(config: ConfigDict) -> ConfigDict:
        if not config.gqvae.train_tokenizer:
            raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint: it is an LM workdir "
                                  "(its config has gqvae.train_tokenizer=False)")
        return config

    try:
        exp, _, state = restore_trained(path, GQVAETask(), edit=require_gqvae)
    except CheckpointError:
        raise
    except ConfigError as e:
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint: {e} (an unfinished run, or an LM workdir?)"
                              ) from None
    return gqvae_config.from_dict(exp.config.gqvae.to_dict(), path), jax.device_get(state.params)


def _load_legacy(path: str) -> tuple[ConfigDict, Any]:
    """The first driver's `gqvae.json` (kind, format_version 1, gqvae section) + orbax `params`."""
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
    try:
        cfg = gqvae_config.from_dict(manifest.get("gqvae", {}), path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    _, abstract = abstract_model(cfg)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(path, "params"), abstract)
    except Exception as e:  # orbax raises many types; any of them means an unusable checkpoint.
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} has unreadable params: {type(e).__name__}") from None
    return cfg, params
