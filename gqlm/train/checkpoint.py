"""Checkpoints: orbax CheckpointManager holding train state, grain iterator state and the config.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a half-written checkpoint that looks like the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from gqlm.config import ConfigDict, ConfigError, config_from_dict
from gqlm.train.state import TrainState


def open_manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """A manager that knows each item's handler, so metadata is readable before any restore."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    for item in ("data", "config"):
        registry.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


class Checkpointer:
    """Save/restore of (state, data iterator, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, train_cfg: ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=train_cfg.keep_checkpoints,
            keep_period=train_cfg.keep_every or None,
            enable_async_checkpointing=True,
            create=True,
        )
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = open_manager(self.directory, options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iter: grain.DatasetIterator, config: ConfigDict,
             force: bool = False) -> bool:
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            # One JSON state for all processes: each slices the same global batch sequence.
            data=ocp.args.JsonSave(data_iter.get_state()),
            config=ocp.args.JsonSave(config.to_dict()),
        ))

    def check_compatible(self, step: int, abstract: TrainState) -> None:
        """Raises ConfigError naming every parameter whose saved shape differs from the model's."""
        try:
            saved_params = _shapes(self.manager.item_metadata(step)["state"].tree["params"])
        except Exception:  # Unreadable metadata: the restore itself reports (and skips) the checkpoint.
            return
        model_params = _shapes(abstract.params)
        diffs = [f"{k}: saved {saved_params.get(k)} vs model {model_params.get(k)}"
                 for k in sorted(set(saved_params) | set(model_params))
                 if saved_params.get(k) != model_params.get(k)]
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 4 else "")
            raise ConfigError(f"checkpoint {self.directory}/{step} is from an incompatible model: {shown}")

    def restore(self, step: int, abstract: TrainState, data_iter: grain.DatasetIterator) -> TrainState:
        """Restores onto the shardings carried by `abstract` (any mesh) and rewinds `data_iter`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        data_iter.set_state(restored["data"])
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_latest(self, abstract: TrainState, data_iter: grain.DatasetIterator) -> TrainState | None:
        """The newest checkpoint that restores; a corrupt one is reported and skipped. None if none."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if steps:
            self.check_compatible(steps[0], abstract)
        for step in steps:
            try:
                return self.restore(step, abstract, data_iter)
            except Exception as e:  # Any read failure means a damaged checkpoint: fall back to an older one.
                logging.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                                self.directory, step, type(e).__name__, str(e).splitlines()[0][:200])
                print(f"gqlm: warning: checkpoint step {step} in {self.directory} is corrupt; "
                      "falling back to the previous one", flush=True)
        if steps:
            raise ConfigError(f"no checkpoint in {self.directory} could be restored")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def _open_read_only(workdir: str, step: int | None = None) -> tuple[ocp.CheckpointManager, int]:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"no checkpoints in {workdir!r} (expected {directory})")
    manager = open_manager(directory, ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise ConfigError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in {directory}")
    return manager, step


def load_state(workdir: str, abstract: TrainState, step: int | None = None) -> tuple[int, TrainState]:
    """State of a training workdir's checkpoint (for eval and sampling), without the data iterator."""
    manager, step = _open_read_only(workdir, step)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    manager.close()
    return step, restored["state"]


def load_config(workdir: str) -> ConfigDict:
    """The config saved with a workdir's latest checkpoint, as a full (defaults-filled) config."""
    manager, step = _open_read_only(workdir)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    return config_from_dict(saved)
