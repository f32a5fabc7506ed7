"""Optional logging and profiling in the runner: Weights & Biases (offline), a profiler window that
tensorboard's profile plugin reads, and the host's waits for data and checkpoints in the metrics."""

import glob
import json
import struct
import sys
import time

import pytest

from gqlm import config as config_lib
from gqlm.config import ConfigError
from gqlm.train import loop, wandb_sink
from gqlm.train.checkpoint import Checkpointer
from gqlm.train.metrics import MetricWriter
from gqlm.train.tasks.lm import LMTask
from tests.helpers import metric_rows, run_cli, smoke_config, train_rows

STEPS, DATA_SLEEP_S, SAVE_SLEEP_S = 4, 0.05, 0.05
RUN = {"train.steps": STEPS, "train.eval_every": 2, "train.checkpoint_every": 1,
       "train.wandb_project": "gqlm-test", "train.profile_steps": "2:4"}


class SlowBatches:
    """Wraps the train iterator: every batch takes at least DATA_SLEEP_S to arrive."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(DATA_SLEEP_S)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with every option on, slow batches and slow checkpoint saves: (workdir, wandb dir, result)."""
    workdir, wandb_dir = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
        monkeypatch.setenv("WANDB_SILENT", "true")
        make, save = loop.make_train_iterator, Checkpointer.save
        monkeypatch.setattr(loop, "make_train_iterator", lambda *a, **k: SlowBatches(make(*a, **k)))

        def slow_save(self, *args, **kwargs):
            time.sleep(SAVE_SLEEP_S)
            return save(self, *args, **kwargs)
        monkeypatch.setattr(Checkpointer, "save", slow_save)
        result = loop.train(smoke_config(**RUN), str(workdir), LMTask())
    return workdir, wandb_dir, result


# ----------------------------------------------------------------------------- Weights & Biases


def wandb_records(path):
    """The protobuf records of an offline run's `.wandb` file (a LevelDB-style log: 32 KiB blocks of
    chunks, each with a 7-byte header: CRC-32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(record)
            record = b""


def wandb_history(path):
    """{step: {key: value}} of the run's logged rows."""
    rows = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def test_wandb_offline_run_holds_the_same_scalars_and_the_config(run):
    workdir, wandb_dir, _ = run
    [path] = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(path)
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert history[row["step"]]["train/loss"] == row["loss"]
        assert history[row["step"]]["train/grad_norm"] == row["grad_norm"]
    assert history[STEPS]["train/loss"] == rows[-1]["loss"]  # the final train loss
    validation = [r for r in metric_rows(workdir) if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [2, 4]
    for row in validation:
        assert history[row["step"]]["validation/bpb"] == row["bpb"]
    [config] = [r.run.config for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    saved = {item.key: json.loads(item.value_json) for item in config.update}
    assert saved["train"]["wandb_project"] == "gqlm-test" and saved["train"]["steps"] == STEPS
    assert saved["model"]["num_layers"] == smoke_config().model.num_layers
    with open(workdir / wandb_sink.RUN_ID_FILE) as f:  # a resumed run continues this wandb run
        assert path.endswith(f"run-{f.read().strip()}.wandb")


def test_run_id_is_created_once_per_workdir(tmp_path):
    first = wandb_sink.run_id(str(tmp_path))
    assert len(first) == 12 and wandb_sink.run_id(str(tmp_path)) == first


def test_missing_wandb_is_a_one_line_config_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    workdir = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"^train.wandb_project='p' needs wandb: pip install -e \.\[wandb\]$"):
        MetricWriter(str(workdir), smoke_config(**{"train.wandb_project": "p"}))
    assert not workdir.exists()


# ----------------------------------------------------------------------------- profiler window


def test_profile_window_leaves_a_trace_of_exactly_its_steps_for_tensorboard(run):
    from jax.profiler import ProfileData
    workdir, _, _ = run
    # Where tensorboard's profile plugin looks under `tensorboard --logdir <workdir>/tensorboard`.
    [trace] = glob.glob(str(workdir / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    steps = set()
    for plane in ProfileData.from_file(trace).planes:
        for line in plane.lines:
            steps |= {dict(event.stats).get("step_num") for event in line.events if event.name == "train"}
    assert steps - {None} == {2, 3}


@pytest.mark.parametrize("value", ["10", "a:b", "4:2", "-1:3", "3:3", "2:99", "1:2:3", "\u00b2:3"])
def test_bad_profile_steps_are_one_line_errors(value):
    with pytest.raises(ConfigError, match=r"^train.profile_steps=.* must be 'START:STOP'"):
        config_lib.validate(smoke_config(**{"train.profile_steps": value}), 8)


def test_bad_profile_steps_exit_2_from_the_cli(tmp_path):
    result = run_cli(tmp_path / "w", **{"train.profile_steps": "15:10"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("gqlm: error: train.profile_steps='15:10'")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- data and checkpoint waits


def test_data_wait_and_checkpoint_block_are_logged_per_step(run):
    workdir, _, result = run
    rows = train_rows(workdir)[1:]  # the first row has no window to measure yet
    assert rows and all(r["data_wait_s"] >= 0 and r["checkpoint_block_s"] > 0 for r in rows)
    # Every window but the last fetches one slow batch per step; every window holds one slow save.
    assert all(r["data_wait_s"] >= DATA_SLEEP_S for r in rows[:-1])
    assert all(r["checkpoint_block_s"] >= SAVE_SLEEP_S for r in rows)
    assert result["checkpoint_block_s"] >= STEPS * SAVE_SLEEP_S
    assert result["checkpoint_block_s"] >= sum(r["checkpoint_block_s"] for r in rows)
