"""The tasks the runner trains, and the registry entry points pick one from."""

from __future__ import annotations

from gqlm.config import ConfigDict
from gqlm.train.tasks.base import Task
from gqlm.train.tasks.gqvae.task import GQVAETask
from gqlm.train.tasks.lm import LMTask


def task_for(config: ConfigDict, dry_run: bool = False) -> Task:
    """The task a config trains: the GQ-VAE tokenizer model with `gqvae.train_tokenizer=True`,
    else the language model (for a dry run, without its tokenizer when model.vocab_size is set)."""
    return GQVAETask() if config.gqvae.train_tokenizer else LMTask(with_tokenizer=not dry_run)
