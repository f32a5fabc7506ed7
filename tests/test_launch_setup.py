"""scripts/setup.sh on a machine whose python3 is too old (Ubuntu 22.04 TPU images ship 3.10).

Every interpreter, pip and uv here is a fake that records its calls, so nothing is installed.
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ("basename", "cat", "sha256sum", "cut", "grep", "rm", "dirname", "mkdir", "cp")

# $1 -c ...: the version check; -m venv DIR: a venv whose python is this script; -m pip: recorded.
FAKE_PYTHON = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$1" in
  -c) exit {too_old} ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
      if [ "$2 $5" = "pip --user" ]; then
        [ -z "$FAKE_PIP_FAILS" ] || exit 1
        mkdir -p "$HOME/.local/bin" && cp "$FAKES/uv" "$HOME/.local/bin/uv"
      fi ;;
esac
"""
FAKE_UV = """#!/bin/bash
echo "uv $*" >> "$FAKE_LOG"
if [ "$1 $2" = "python find" ]; then echo "$FAKES/python3.11"; fi
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path):
    """A repository copy, a PATH with the basic tools and a python3 of 3.10, and the fakes."""
    repo, bin_dir, fakes = tmp_path / "repo", tmp_path / "bin", tmp_path / "fakes"
    write(repo / "scripts" / "setup.sh", (ROOT / "scripts" / "setup.sh").read_text())
    (repo / "setup.py").write_text("setup()\n")
    for tool in TOOLS:
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / tool).symlink_to(shutil.which(tool))
    write(bin_dir / "python3", FAKE_PYTHON.format(too_old=1))
    write(fakes / "python3.11", FAKE_PYTHON.format(too_old=0))
    write(fakes / "uv", FAKE_UV)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path / "home"), "FAKES": str(fakes),
           "FAKE_LOG": str(tmp_path / "calls.log")}
    return repo, env, tmp_path / "calls.log"


def setup(repo, env):
    return subprocess.run(["/bin/bash", str(repo / "scripts" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_python_3_11_comes_from_uv_when_the_image_has_3_10(machine):
    repo, env, log = machine
    write(repo / ".venv" / "bin" / "python", FAKE_PYTHON.format(too_old=1))  # a venv left by python 3.10
    result = setup(repo, env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert "python3 -m pip install -q --user uv" in calls
    assert calls.index("uv python install 3.11") < calls.index("uv python find 3.11")
    assert "python3.11 -m venv .venv" in calls
    assert "python -m pip install -q -e ." in calls  # by the new venv's python
    assert (repo / ".venv" / ".gqlm-installed").exists()
    log.unlink()
    assert setup(repo, env).returncode == 0 and "uv" not in log.read_text()  # a re-run reuses the venv


def test_no_way_to_python_3_11_is_one_line_naming_the_fix(machine):
    repo, env, log = machine
    result = setup(repo, {**env, "FAKE_PIP_FAILS": "1"})
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and len(errors) == 1
    assert errors[0].startswith("scripts/setup.sh: error: ") and "PYTHON=" in errors[0] and "uv" in errors[0]
    assert not (repo / ".venv").exists()


def test_a_new_enough_python3_is_used_directly(machine):
    repo, env, log = machine
    write(pathlib.Path(env["PATH"]) / "python3", FAKE_PYTHON.format(too_old=0))
    assert setup(repo, env).returncode == 0
    calls = log.read_text().splitlines()
    assert "python3 -m venv .venv" in calls and not any(c.startswith("uv") for c in calls)
    shutil.rmtree(repo / ".venv")
    old = pathlib.Path(env["PATH"]) / "python3.10"
    write(old, FAKE_PYTHON.format(too_old=1))
    result = setup(repo, {**env, "PYTHON": str(old)})
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"scripts/setup.sh: error: PYTHON={old} is not Python >= 3.11"]
