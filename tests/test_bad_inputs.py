"""Bad input -> one line `gqlm: error: ...` naming the culprit, exit code 2, workdir untouched.

One table across config files, overrides, validation, CLI flags, data, tokenizers and checkpoints
(the training, eval and sampling entry points). Each case runs the real `python -m gqlm.X` main in
its own process; to avoid paying the ~4 s of imports per case, one driver process imports the
libraries once and forks a child per case before any jax backend exists (run this file as a
script: `python tests/test_bad_inputs.py CASES.json RESULTS.json`).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from gqlm.train.tasks.lm import LMTask

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SMOKE = "experiments/tiny_cpu.py:smoke"
TRAINED = "{trained}"  # placeholder: a fresh copy of a workdir holding checkpoints at steps 2 and 4


def cases(tmp):
    """(module, args, culprit, workdir): workdir is None (a fresh path), TRAINED, or a path to create."""
    def write(name, text):
        (tmp / name).write_text(text)
        return str(tmp / name)

    empty, tiny = write("empty.txt", ""), write("tiny.txt", "short")
    broken = write("broken.py", "def get_config(:\n")
    no_get_config = write("no_get_config.py", "X = 1\n")
    (tmp / "bpe_dir").mkdir()
    write("bpe_dir/gqlm_tokenizer.json", json.dumps({"kind": "bpe", "format_version": 1}))
    (tmp / "empty_dir").mkdir()
    a_file = write("a_file", "not a directory")
    t = "gqlm.train"
    return [
        # experiment files
        (t, ["--config", str(tmp / "missing.py")], "missing.py", None),
        (t, ["--config", broken], "broken.py", None),
        (t, ["--config", no_get_config], "defines no get_config", None),
        (t, ["--config", "experiments/tiny_cpu.py:huge"], "'huge'", None),
        # overrides
        (t, ["--config.model.num_layerz=2"], "model.num_layerz", None),
        (t, ["--config.modle.num_layers=2"], "'modle'", None),
        (t, ["--config.model.num_layers=two"], "model.num_layers", None),
        (t, ["--config.model.num_layers"], "--config.model.num_layers", None),
        (t, ["--config.model.tie_embeddings=maybe"], "model.tie_embeddings", None),
        (t, ["--config.model=3"], "'model'", None),
        # validation
        (t, ["--config.mesh.data=3"], "mesh", None),
        (t, ["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "mesh.data, mesh.fsdp", None),
        (t, ["--config.model.num_heads=3"], "model.num_heads=3", None),
        (t, ["--config.model.num_kv_heads=3"], "model.num_kv_heads=3", None),
        (t, ["--config.data.batch_size=12"], "data.batch_size=12", None),
        (t, ["--config.data.seq_len=4096"], "data.seq_len=4096", None),
        (t, ["--config.optimizer.name=adamq"], "optimizer.name", None),
        (t, ["--config.optimizer.learning_rate=-1.0"], "optimizer.learning_rate=-1.0", None),
        (t, ["--config.train.nonfinite=ignore"], "train.nonfinite='ignore'", None),
        (t, ["--config.train.grad_accum=0"], "train.grad_accum=0", None),
        (t, ["--config.model.position=xpos"], "model.position='xpos'", None),
        # CLI flags
        (t, ["--workdir="], "--workdir is required", None),
        (t, ["--wrkdir=/tmp/x"], "wrkdir", None),
        (t, ["--stop_at_step=ten"], "stop_at_step", None),
        (t, ["--stop_at_step=0"], "--stop_at_step=0", None),
        (t, ["extra_argument"], "extra_argument", None),
        (t, [], "is not a directory", a_file),
        # data
        (t, ["--config.data.corpus=wikipedia"], "data.corpus='wikipedia'", None),
        (t, ["--config.data.corpus=text_files"], "data.glob", None),
        (t, ["--config.data.corpus=text_files", f"--config.data.glob={tmp}/nothing/*.txt"], "data.glob", None),
        (t, ["--config.data.corpus=text_files", f"--config.data.glob={empty}"], "empty", None),
        (t, ["--config.data.corpus=text_files", f"--config.data.glob={tiny}"], "too small", None),
        # tokenizers
        (t, ["--config.data.tokenizer=wordpiece"], "data.tokenizer='wordpiece'", None),
        (t, ["--config.data.tokenizer=bpe:/no/such/dir"], "/no/such/dir", None),
        (t, [f"--config.data.tokenizer=bpe:{tmp}/empty_dir"], "gqlm_tokenizer.json", None),
        (t, [f"--config.data.tokenizer=gqvae:{tmp}/bpe_dir"], "not 'gqvae'", None),
        (t, ["--config.model.vocab_size=128"], "model.vocab_size=128", None),
        # checkpoints in an existing workdir
        (t, ["--config.model.mlp_dim=96"], "incompatible model/optimizer: params/blocks/0/mlp", TRAINED),
        (t, ["--config.model.num_layers=3"], "params/blocks/2", TRAINED),
        (t, ["--config.optimizer.name=lion"], "opt_state", TRAINED),
        (t, ["--config.train.grad_accum=5"], "data.batch_size=16", TRAINED),
        (t, ["--corrupt_all"], "could be restored", TRAINED),
        ("gqlm.eval", ["--config.model.mlp_dim=96"], "params/blocks/0/mlp", TRAINED),
        ("gqlm.eval", ["--step=3"], "no complete checkpoint at step 3", TRAINED),
        ("gqlm.eval", ["--config.model.num_layerz=1"], "model.num_layerz", TRAINED),
        ("gqlm.eval", [], "no checkpoints in", str(tmp / "empty_dir")),
        ("gqlm.sample", [], "no checkpoints in", None),
        ("gqlm.sample", ["--num_tokens=0"], "--num_tokens", TRAINED),
    ]


def tree_digest(path):
    """Names, kinds, sizes, mtimes and contents of everything under `path` (None if absent)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        h.update(f"D {os.path.relpath(root, path)}\n".encode())
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            with open(full, "rb") as f:
                h.update(f"F {name} {st.st_size} {st.st_mtime_ns} ".encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def corrupt_every_checkpoint(workdir):
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        metadata = os.path.join(workdir, "checkpoints", step, "state", "_METADATA")
        with open(metadata, "r+b") as f:
            f.truncate(10)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    from gqlm import config as config_lib
    from gqlm.train.loop import train
    workdir = tmp_path_factory.mktemp("trained") / "run"
    config = config_lib.apply_override_strings(config_lib.load_experiment(os.path.join(ROOT, SMOKE)), {
        "train.steps": "4", "train.checkpoint_every": "2", "train.sample_tokens": "0"})
    train(config, str(workdir), LMTask())
    return workdir


def run_cases(tmp_path, runs, timeout):
    """Each run's `python -m MODULE ARGV` through the forking driver (below); their results, in order."""
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.json"
    cases_file.write_text(json.dumps(runs))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    driver = subprocess.run([sys.executable, os.path.abspath(__file__), str(cases_file), str(results_file)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return json.loads(results_file.read_text())


def assert_one_line_naming(run, result):
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["returncode"] == 2 and len(lines) == 1 and run["culprit"] in lines[0], (run, result)


def test_bad_input_is_one_line_exit_2_and_leaves_workdir_untouched(tmp_path, trained_workdir):
    table = cases(tmp_path)
    assert len(table) >= 25
    runs = []
    for i, (module, args, culprit, workdir) in enumerate(table):
        if workdir == TRAINED:
            workdir = str(tmp_path / f"trained_{i}")
            shutil.copytree(trained_workdir, workdir)
            if "--corrupt_all" in args:
                corrupt_every_checkpoint(workdir)
                args = [a for a in args if a != "--corrupt_all"]
        workdir = workdir or str(tmp_path / f"fresh_{i}")
        argv = list(args)
        if module == "gqlm.train" and not any(a.startswith("--config=") or a == "--config" for a in argv):
            argv = ["--config", SMOKE, *argv]
        if not any(a.startswith("--workdir") for a in argv):
            argv = ["--workdir", workdir, *argv]
        runs.append({"module": module, "argv": argv, "culprit": culprit, "workdir": workdir,
                     "before": tree_digest(workdir)})
    failures = []
    for run, result in zip(runs, run_cases(tmp_path, runs, timeout=900), strict=True):
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        problems = []
        if result["returncode"] != 2:
            problems.append(f"exit code {result['returncode']}")
        if len(lines) != 1 or not lines[0].startswith("gqlm: error: "):
            problems.append("stderr is not one 'gqlm: error:' line")
        elif run["culprit"] not in lines[0]:
            problems.append(f"culprit {run['culprit']!r} not named")
        if tree_digest(run["workdir"]) != run["before"]:
            problems.append("workdir changed")
        if problems:
            failures.append(f"{run['module']} {' '.join(run['argv'][2:])}: {', '.join(problems)}\n"
                            f"    stderr: {result['stderr'][-600:]!r}")
    assert not failures, "\n".join(failures)


def test_bad_input_to_the_export_score_and_sample_commands(tmp_path, trained_workdir):
    """As above, for flags of gqlm.export / gqlm.score / gqlm.sample: refused before the checkpoint is
    read, and neither the workdir nor the --out path changes."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model-00001-of-00002.safetensors").write_text("another model")
    out_dir = tmp_path / "out_dir"
    out_dir.mkdir()
    table = [("gqlm.export", ["--out", str(foreign)], "'model-00001-of-00002.safetensors'", foreign),
             ("gqlm.score", ["--out", str(out_dir)], "is a directory", out_dir),
             ("gqlm.score", ["--out", str(tmp_path / "s.parquet"), "--batches=0"], "--batches=0",
              tmp_path / "s.parquet"),
             ("gqlm.sample", ["--temperature=nan"], "--temperature=nan", tmp_path / "unused")]
    runs = []
    for i, (module, args, culprit, out) in enumerate(table):
        workdir = str(tmp_path / f"trained_{i}")
        shutil.copytree(trained_workdir, workdir)
        runs.append({"module": module, "argv": ["--workdir", workdir, *args], "culprit": culprit, "out": str(out),
                     "before": (tree_digest(workdir), tree_digest(str(out))), "workdir": workdir})
    for run, result in zip(runs, run_cases(tmp_path, runs, timeout=300), strict=True):
        assert_one_line_naming(run, result)
        assert (tree_digest(run["workdir"]), tree_digest(run["out"])) == tuple(run["before"]), run


def test_bad_input_to_the_gqvae_commands(tmp_path):
    """GQ-VAE: odd training values, a --vocab_size no tokenizer can have and a --out that is a file
    are refused before any work (they used to train to NaN, train for nothing or fail after the
    build with a traceback), and neither the workdir nor the --out path changes."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    gq, smoke = "gqlm.train.tasks.gqvae.train", ["--config", "experiments/gqvae_shakespeare.py:smoke"]
    table = [("gqlm.train", [*smoke, "--config.gqvae.learning_rate=inf"], "gqvae.learning_rate=inf", None),
             ("gqlm.train", [*smoke, "--config.gqvae.gate_target_len=0.5"], "gqvae.gate_target_len=0.5", None),
             (gq, [*smoke, "--vocab_size=5"], "--vocab_size=5", None),
             ("gqlm.tokenize", ["--kind=gqvae", f"--checkpoint={tmp_path}/none", "--vocab_size=300",
                                f"--out={a_file}"], f"--out={str(a_file)!r}", a_file)]
    runs = []
    for i, (module, args, culprit, out) in enumerate(table):
        workdir = str(tmp_path / f"fresh_{i}")
        argv = args if module == "gqlm.tokenize" else ["--workdir", workdir, *args]
        out = str(out or workdir)
        runs.append({"module": module, "argv": argv, "culprit": culprit, "out": out, "before": tree_digest(out)})
    for run, result in zip(runs, run_cases(tmp_path, runs, timeout=300), strict=True):
        assert_one_line_naming(run, result)
        assert tree_digest(run["out"]) == run["before"], run


# ----------------------------------------------------------------------------- the forking driver


def _drive(cases_path: str, results_path: str) -> None:
    """Imports the libraries once, then runs each case's `python -m MODULE ARGV` in a forked child."""
    import runpy
    import tempfile

    import absl.app  # noqa: F401
    import jax  # noqa: F401  (imported, not initialised: no backend or thread exists before fork)
    import gqlm.cli  # noqa: F401
    import gqlm.train.loop  # noqa: F401
    import gqlm.train.sampling  # noqa: F401

    results = []
    for case in json.load(open(cases_path)):
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            pid = os.fork()
            if pid == 0:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                code = 1
                try:
                    sys.argv = [case["module"], *case["argv"]]
                    runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    import traceback
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read(),
                            "stderr": err.read()})
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])

