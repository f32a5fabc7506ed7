"""The tasks the runner trains, and the registry entry points pick one from."""

from __future__ import annotations

from gqlm.config import ConfigDict
from gqlm.train.tasks.base import Task
from gqlm.train.tasks.gqvae.task import GQVAETask
from gqlm.train.tasks.lm import LMTask


def task_for(config: ConfigDict) -> Task:
    """The task a config trains: the GQ-VAE tokenizer model with `gqvae.train_tokenizer=True`,
    else the language model."""
    return GQVAETask() if config.gqvae.train_tokenizer else LMTask()
