"""Weights & Biases as one more MetricWriter sink (train.wandb_project; off by default).

wandb is an optional extra (`pip install -e .[wandb]`), imported only when a project is set. Files
go to `<workdir>/wandb/` (or $WANDB_DIR); the run id is kept in `<workdir>/wandb_run_id`, so a
resumed run continues the same wandb run (on a gs:// workdir: files in $WANDB_DIR or ./wandb, and
each resume starts a new wandb run). WANDB_MODE=offline, WANDB_ENTITY and the other WANDB_*
variables work as usual.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from gqlm.config import ConfigDict, ConfigError
from gqlm.train.checkpoint import is_remote

RUN_ID_FILE = "wandb_run_id"


def import_wandb(project: str) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"train.wandb_project={project!r} needs wandb: pip install -e .[wandb]") from None
    return wandb


def run_id(workdir: str) -> str:
    """The workdir's wandb run id, created on its first run."""
    path = os.path.join(workdir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    new_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(new_id + "\n")
    return new_id


class WandbSink:
    """Logs every scalar as `<prefix>/<name>` at its step; the run's config is the full gqlm config."""

    def __init__(self, workdir: str, config: ConfigDict):
        wandb = import_wandb(config.train.wandb_project)
        local = not is_remote(workdir)  # wandb writes local files only: a bucket workdir uses the default dir
        if local:
            os.makedirs(workdir, exist_ok=True)
        self.run = wandb.init(
            project=config.train.wandb_project, config=config.to_dict(),
            name=os.path.basename(os.path.normpath(workdir)),
            id=run_id(workdir) if local else None, resume="allow",
            dir=workdir if local and "WANDB_DIR" not in os.environ else None)

    def write(self, step: int, prefix: str, scalars: dict[str, float]) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
