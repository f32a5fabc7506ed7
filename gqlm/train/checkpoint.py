"""Checkpoints: orbax CheckpointManager holding train state, grain iterator state and the config.

Atomic: orbax writes each step into a temporary directory and renames it when complete, so a
killed process never leaves a half-written checkpoint that looks like the latest one; the next
run deletes such temporary directories (before its first save).
Verified: orbax does not checksum array data, so once a save is finalized (at the next save or
at `wait()`) process 0 writes `gqlm_manifest.json` into the step directory: every file's size and
CRC-32. A restore checks it first; a checkpoint whose files differ is reported and skipped, the
previous one is used, and the corrupt ones are moved to `<workdir>/checkpoints_corrupt/` so new
saves can reuse their step numbers. A checkpoint without a manifest yet (the process died between
the rename and the manifest) is accepted if it restores. `train.verify_checkpoints=False` skips
both the manifest and the check (reading every byte of a pod's checkpoint on one host is slow).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gqlm.config import ConfigDict, ConfigError, config_from_dict
from gqlm.train.experiment import Builder, Experiment, build_experiment
from gqlm.train.state import TrainState

MANIFEST = "gqlm_manifest.json"


def open_manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """A manager that knows each item's handler, so metadata is readable before any restore."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    for item in ("data", "config"):
        registry.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


# ----------------------------------------------------------------------------- manifests


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    """Relative paths of the checkpoint's files (the manifest and its temporary file excluded)."""
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
    return sorted(f for f in out if not f.startswith(MANIFEST))


def write_manifest(step_dir: str) -> None:
    """Records the size and CRC-32 of every file of a finalized checkpoint (atomically)."""
    files = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
             for f in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as fp:
        json.dump({"version": 1, "checksum": "crc32", "files": files}, fp)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def check_manifest(step_dir: str) -> str | None:
    """What is wrong with a checkpoint's files, or None if they match its manifest (or it has none)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fp:
            expected = {f: (int(size), int(crc)) for f, (size, crc) in json.load(fp)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    for f, (size, _) in expected.items():  # Sizes first: cheap, and they catch truncation.
        full = os.path.join(step_dir, f)
        if not os.path.isfile(full):
            return f"{f} is missing"
        if os.path.getsize(full) != size:
            return f"{f} has {os.path.getsize(full)} bytes, its manifest says {size}"
    for f, (_, crc) in expected.items():
        if _crc32(os.path.join(step_dir, f)) != crc:
            return f"{f} fails its CRC-32 check"
    return None


def _agreed_problem(step_dir: str) -> str | None:
    """check_manifest on process 0, shared with every process so all restore the same step."""
    problem = check_manifest(step_dir) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if multihost_utils.broadcast_one_to_all(np.int32(problem is not None)) and problem is None:
            problem = "process 0 found its files corrupt"
    return problem


def _warn(message: str) -> None:
    logging.warning(message)
    if jax.process_index() == 0:
        print(f"gqlm: warning: {message}", flush=True)


def checkpoint_directory(workdir: str) -> str:
    """`workdir/checkpoints`; remote workdirs (gs://...) are passed to orbax untouched."""
    if is_remote(workdir):
        return workdir.rstrip("/") + "/checkpoints"
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def is_remote(path: str) -> bool:
    return "://" in path


# ----------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Save/restore of (state, data iterator, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, train_cfg: ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=train_cfg.keep_checkpoints,
            keep_period=train_cfg.keep_every or None,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # Saves a killed run left unfinished; else kept until re-saved.
        )
        self.directory = checkpoint_directory(workdir)
        self.corrupt_directory = self.directory + "_corrupt"
        # Manifests use local file access; on a bucket, orbax's own atomic commit is what we rely on.
        self.verify = train_cfg.verify_checkpoints and not is_remote(workdir)
        self.manager = open_manager(self.directory, options)
        self._unsealed: list[int] = []  # saved steps whose manifest is not written yet

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iter: grain.DatasetIterator, config: ConfigDict) -> bool:
        """Starts an async save (after sealing the previous one); False if `step` is already saved."""
        self._seal()  # Orbax waits for the previous save here anyway.
        if step in self.manager.all_steps():
            return False
        saved = self.manager.save(step, force=True, args=ocp.args.Composite(  # The loop decides when.
            state=ocp.args.StandardSave(state),
            # One JSON state for all processes: each slices the same global batch sequence.
            data=ocp.args.JsonSave(data_iter.get_state()),
            config=ocp.args.JsonSave(config.to_dict()),
        ))
        if saved:
            self._unsealed.append(step)
        return saved

    def _seal(self) -> None:
        """Waits for pending saves, then writes the manifest of each (process 0)."""
        self.manager.wait_until_finished()
        if self.verify and jax.process_index() == 0:
            for step in self._unsealed:
                if os.path.isdir(self.step_dir(step)):  # Gone if already garbage-collected.
                    write_manifest(self.step_dir(step))
        self._unsealed = []

    def restore(self, step: int, abstract: TrainState, data_iter: grain.DatasetIterator) -> TrainState:
        """Restores onto the shardings carried by `abstract` (any mesh) and rewinds `data_iter`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        data_iter.set_state(restored["data"])
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_latest(self, abstract: TrainState, data_iter: grain.DatasetIterator) -> TrainState | None:
        """The newest checkpoint that verifies and restores; corrupt ones are reported, skipped and,
        once an older one restored, moved aside. None if there is no checkpoint."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        checked = False
        for i, step in enumerate(steps):
            problem = _agreed_problem(self.step_dir(step)) if self.verify else None
            if problem is None:
                if not checked:  # A config mismatch is the user's error, not corruption: say so.
                    check_compatible(self.manager, self.step_dir(step), step, abstract)
                    checked = True
                try:
                    state = self.restore(step, abstract, data_iter)
                except Exception as e:  # Any read failure means a damaged checkpoint: try an older one.
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                else:
                    self._quarantine(steps[:i])
                    return state
            _warn(f"checkpoint step {step} in {self.directory} is corrupt ({problem}); "
                  "falling back to the previous one")
        if steps:
            raise ConfigError(f"no checkpoint in {self.directory} could be restored "
                              f"(all {len(steps)} are corrupt, see the warnings above)")
        return None

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config saved with checkpoint `step`, as a plain dict."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def _quarantine(self, steps: list[int]) -> None:
        """Moves corrupt checkpoints aside, so they are neither 'latest' nor in the way of new saves."""
        if not steps:
            return
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            for step in steps:
                dest = os.path.join(self.corrupt_directory, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(self.step_dir(step), dest)
                _warn(f"moved corrupt checkpoint step {step} to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("gqlm_checkpoint_quarantine")
        self.manager.reload()

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> current' for each leaf of two nested config dicts that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def warn_config_changes(checkpointer: "Checkpointer", step: int, config: ConfigDict) -> None:
    """Resuming with another config is allowed (a longer schedule, a new batch size), but said."""
    try:
        saved = checkpointer.saved_config(step)
    except Exception:  # an unreadable config item: the state restored, so nothing to say about it
        return
    changes = config_changes(saved, json.loads(json.dumps(config.to_dict())))  # tuples as saved: lists
    if changes:
        shown = "; ".join(changes[:6]) + (f"; ... ({len(changes)} in all)" if len(changes) > 6 else "")
        _warn(f"resuming step {step} with a config that differs from the checkpoint's: {shown}")


def check_compatible(manager: ocp.CheckpointManager, where: str, step: int, abstract: TrainState) -> None:
    """Raises ConfigError naming the arrays whose saved shape differs (params first, then optimizer)."""
    try:
        saved = _shapes(manager.item_metadata(step)["state"].tree)
    except Exception:  # Unreadable metadata: the restore itself reports (and skips) the checkpoint.
        return
    wanted = _shapes(abstract)
    diffs = [f"{k}: saved {saved.get(k)} vs config {wanted.get(k)}"
             for k in sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith("params"), k))
             if saved.get(k) != wanted.get(k)]
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 3 else "")
        raise ConfigError(f"checkpoint {where} is from an incompatible model/optimizer: {shown}")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


# ----------------------------------------------------------------------------- read-only access


def _open_read_only(workdir: str, step: int | None = None) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager and the requested step (default: the newest whose manifest verifies)."""
    directory = checkpoint_directory(workdir)
    if not is_remote(directory) and not os.path.isdir(directory):
        raise ConfigError(f"no checkpoints in {workdir!r} (expected {directory})")
    manager = open_manager(directory, ocp.CheckpointManagerOptions(read_only=True))
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if step is not None and step not in manager.all_steps():
        raise ConfigError(f"no complete checkpoint at step {step} in {directory}")
    for candidate in candidates:
        problem = None if is_remote(directory) else _agreed_problem(os.path.join(directory, str(candidate)))
        if problem is None:
            return manager, candidate
        if step is not None:
            raise ConfigError(f"checkpoint {directory}/{step} is corrupt: {problem}")
        _warn(f"checkpoint step {candidate} in {directory} is corrupt ({problem}); using an older one")
    raise ConfigError(f"no complete, uncorrupted checkpoint in {directory}")


class SavedRun:
    """Read-only view of one checkpoint of a training workdir (default: the newest that verifies).

    The manifest is checked once, on opening; the config and the state are then read from that
    same step, so eval/sample/score never verify (read every byte of) a checkpoint twice.
    """

    def __init__(self, workdir: str, step: int | None = None):
        self.manager, self.step = _open_read_only(workdir, step)

    def config(self) -> ConfigDict:
        """The saved config, as a full (defaults-filled) config."""
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return config_from_dict(self.manager.restore(self.step, args=args)["config"])

    def state(self, abstract: TrainState) -> TrainState:
        """The saved train state on the shardings of `abstract` (any mesh), without the data iterator."""
        check_compatible(self.manager, os.path.join(self.manager.directory, str(self.step)), self.step, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return self.manager.restore(self.step, args=args)["state"]

    def __enter__(self) -> "SavedRun":
        return self

    def __exit__(self, *exc) -> None:
        self.manager.close()


def load_state(workdir: str, abstract: TrainState, step: int | None = None) -> tuple[int, TrainState]:
    """(step, state) of a training workdir's checkpoint, without the data iterator."""
    with SavedRun(workdir, step) as run:
        return run.step, run.state(abstract)


def load_config(workdir: str) -> ConfigDict:
    """The config saved with a workdir's newest verified checkpoint."""
    with SavedRun(workdir) as run:
        return run.config()


def restore_trained(workdir: str, task: Builder, step: int | None = None,
                    edit: Callable[[ConfigDict], ConfigDict] | None = None) -> tuple[Experiment, int, Any]:
    """(experiment, step, state) of a training workdir's checkpoint (default: the newest that
    verifies), restored onto the mesh of its saved config, changed first by `edit` if given
    (e.g. command-line overrides: another mesh, another corpus)."""
    with SavedRun(workdir, step) as run:
        config = run.config()
        if config.init.from_hf:  # the saved model section already has its shape
            with config.unlocked():
                config.init.from_hf = ""
        exp = build_experiment(edit(config) if edit else config, task)
        with jax.set_mesh(exp.mesh):
            return exp, run.step, run.state(exp.abstract)
