"""Launchers: the exact gcloud / sbatch commands of --dry_run, and one-line errors before anything starts.

Expected command lines are written out here from the inputs, not produced by the launcher's helpers.
"""

import importlib.metadata
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from launch import gpu_slurm, local, multinode, tpu
from launch.common import LaunchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX = importlib.metadata.version("jax")  # the installed jax is the version setup.py pins


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # experiment paths in commands are relative to the repository


def fake_gcloud(tmp_path, project=""):
    """A `gcloud` that records every call and answers `config get-value project` with `project`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls.txt"
    script = bin_dir / "gcloud"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                      f'if [ "$1 $2 $3" = "config get-value project" ]; then echo "{project}"; fi\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir), calls


def run_main(main, argv, capsys):
    """(exit code, stdout lines, stderr lines) of an in-process launcher run."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def remote_setup():
    return ("set -e; mkdir -p ~/gqlm && tar -xzf ~/gqlm-src.tar.gz -C ~/gqlm && cd ~/gqlm && "
            f'bash scripts/setup.sh && .venv/bin/pip install -q "jax[tpu]=={JAX}"')


def remote_command(line):
    """(the gcloud words before --command, the remote script) of a printed ssh line."""
    words = shlex.split(line)
    assert words[-1].startswith("--command=")
    return words[:-1], words[-1][len("--command="):]


def detached_job(script):
    """The job a start script hands to `setsid nohup bash -c JOB`, unquoted."""
    words = shlex.split(script.split("setsid nohup bash -c ", 1)[1])
    return words[0]


TRAIN = "python -m gqlm.train --config experiments/tiny_cpu.py --workdir gs://bucket/run"


def test_tpu_vm_launch_dry_run(capsys):
    argv = ["launch", "--name", "gq-v4", "--zone", "us-central2-b", "--project", "proj", "--accelerator_type",
            "v4-32", "--spot", "--dry_run", "--", *TRAIN.split(), "--config.mesh.data=16"]
    code, out, err = run_main(tpu.main, argv, capsys)
    assert (code, err) == (0, [])
    where = "--project=proj --zone=us-central2-b"
    train = TRAIN + " --config.mesh.data=16"
    assert out[0] == (f"gcloud compute tpus tpu-vm create gq-v4 {where} --accelerator-type=v4-32 "
                      "--version=tpu-ubuntu2204-base --spot")
    assert out[1].startswith("# pack the working tree") and out[1].endswith("/tmp/gqlm-src-gq-v4.tar.gz")
    assert out[2:4] == [
        f"gcloud compute tpus tpu-vm scp /tmp/gqlm-src-gq-v4.tar.gz gq-v4:gqlm-src.tar.gz {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh gq-v4 {where} --worker=all --command={shlex.quote(remote_setup())}"]
    ssh = f"gcloud compute tpus tpu-vm ssh gq-v4 {where}".split()
    start, follow, status = (remote_command(line) for line in out[4:5] + out[6:8])
    assert start[0] == ssh + ["--worker=all"] and follow[0] == ssh + ["--worker=0"] and status[0] == ssh + ["--worker=all"]
    # Detached (a new session, immune to the ssh's hangup), logged, with an exit marker.
    job = detached_job(start[1])
    assert f"export GQLM_DISTRIBUTED=auto; {train} > logs/gq-v4.log 2>&1 < /dev/null; " in job
    assert job.endswith("echo $? > logs/gq-v4.exit.tmp && mv logs/gq-v4.exit.tmp logs/gq-v4.exit")
    assert "/tmp/libtpu_lockfile" in start[1]  # stale TPU holders and lock cleaned first
    assert "tail -n +1 -F" in follow[1] and "logs/gq-v4.exit" in status[1]
    assert out[8:] == ["# once every worker's exit marker is there:",
                       f"gcloud compute tpus tpu-vm delete gq-v4 {where} --quiet"]


def test_tpu_multislice_queued_dry_run(capsys):
    argv = ["launch", "--name", "ms", "--zone", "us-east5-b", "--project", "proj", "--accelerator_type",
            "v5litepod-16", "--num_slices", "2", "--spot", "--reserved", "--valid_until_duration", "6h",
            "--env", "WANDB_MODE=offline", "--dry_run", "--", *TRAIN.split(), "--config.mesh.data=32"]
    code, out, err = run_main(tpu.main, argv, capsys)
    assert (code, err) == (0, [])
    where = "--project=proj --zone=us-east5-b"
    commands = [line for line in out if not line.startswith("#")]
    assert commands[:6] == [
        f"gcloud compute tpus queued-resources create ms {where} --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=ms --spot --reserved "
        "--valid-until-duration=6h",
        f"gcloud compute tpus queued-resources describe ms {where} --format=json",
        f"gcloud compute tpus tpu-vm scp /tmp/gqlm-src-ms.tar.gz ms-0:gqlm-src.tar.gz {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh ms-0 {where} --worker=all --command={shlex.quote(remote_setup())}",
        f"gcloud compute tpus tpu-vm scp /tmp/gqlm-src-ms.tar.gz ms-1:gqlm-src.tar.gz {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh ms-1 {where} --worker=all --command={shlex.quote(remote_setup())}",
    ]
    assert "at most 21600 s" in out[1]  # the wait is bounded by --valid_until_duration
    starts = [remote_command(line) for line in commands[6:8]]
    assert [words[5] for words, _ in starts] == ["ms-0", "ms-1"]
    assert "export WANDB_MODE=offline; " in detached_job(starts[0][1])
    assert commands[-1] == f"gcloud compute tpus queued-resources delete ms {where} --force --quiet"


def test_tpu_env_values_keep_their_spaces_and_keys_are_checked(capsys):
    base = ["run", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", "v4-8", "--dry_run"]
    code, out, _ = run_main(tpu.main, base + ["--env", "LIBTPU_INIT_ARGS=--a=1 --b=2", "--", "env"], capsys)
    job = detached_job(remote_command(out[0])[1])
    # Run the job's export as bash would: one variable, spaces kept (not a command named 'KEY=VALUE').
    export = job[job.index("export LIBTPU_INIT_ARGS="):].split("; ")[0]
    result = subprocess.run(["bash", "-c", f'{export}; printf "%s|" "$LIBTPU_INIT_ARGS"'], capture_output=True,
                            text=True)
    assert (result.returncode, result.stdout) == (0, "--a=1 --b=2|")
    for bad in ["1BAD=x", "NO_VALUE", "A-B=1", "=x"]:
        code, out, err = run_main(tpu.main, base + ["--env", bad, "--", "env"], capsys)
        assert code == 2 and out == [] and len(err) == 1 and repr(bad) in err[0]


def test_tpu_single_steps_and_default_project(tmp_path, monkeypatch, capsys):
    bin_dir, _ = fake_gcloud(tmp_path, project="from-gcloud")
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    code, out, _ = run_main(tpu.main, ["delete", "--name", "n", "--zone", "z", "--queued", "--dry_run"], capsys)
    assert (code, out) == (0, ["# delete:", "gcloud compute tpus queued-resources delete n "
                               "--project=from-gcloud --zone=z --force --quiet"])
    code, out, _ = run_main(tpu.main, ["create", "--name", "n", "--zone", "z", "--accelerator_type", "v3-8",
                                       "--version", "my-image", "--preemptible", "--dry_run"], capsys)
    assert (code, out) == (0, ["gcloud compute tpus tpu-vm create n --project=from-gcloud --zone=z "
                               "--accelerator-type=v3-8 --version=my-image --preemptible"])
    for step in ("logs", "status", "stop"):  # no accelerator type needed: they work from any machine
        code, out, _ = run_main(tpu.main, [step, "--name", "n", "--zone", "z", "--dry_run"], capsys)
        assert code == 0 and out[-1].startswith("gcloud compute tpus tpu-vm ssh n --project=from-gcloud --zone=z")


@pytest.mark.parametrize("accelerator, devices", [
    ("v2-8", 8), ("v3-32", 32), ("v4-8", 4), ("v4-32", 16), ("v5p-128", 64), ("v5litepod-16", 16),
    ("v6e-8", 8), ("v6e-256", 256)])
def test_tpu_device_counts(accelerator, devices):
    assert tpu.num_devices(accelerator) == devices


@pytest.mark.parametrize("accelerator, hosts", [
    ("v2-8", 1), ("v3-32", 4), ("v4-8", 1), ("v4-32", 4), ("v5p-128", 16), ("v5litepod-8", 1),
    ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-64", 16)])
def test_tpu_host_counts(accelerator, hosts):
    assert tpu.num_hosts(accelerator) == hosts


@pytest.mark.parametrize("accelerator", ["v9-8", "v4", "v4-1", "tpu-v4-8"])
def test_tpu_unknown_accelerator(accelerator):
    with pytest.raises(LaunchError, match="accelerator_type"):
        tpu.num_devices(accelerator)


@pytest.mark.parametrize("accelerator, slices, override, needle", [
    ("v4-32", 1, [], "16 devices"),  # tiny_cpu's mesh.data=8 on 16 devices
    ("v5p-8", 1, [], "4 devices"),
    ("v6e-8", 2, ["--config.mesh.data=-1", "--config.mesh.fsdp=16"], "multiple of the 2 slices"),
    ("v4-16", 1, ["--config.mesh.data=8", "--config.data.batch_size=12"], "data.batch_size=12"),
])
def test_tpu_config_that_does_not_fit_creates_nothing(tmp_path, monkeypatch, capsys, accelerator, slices,
                                                      override, needle):
    bin_dir, calls = fake_gcloud(tmp_path, project="p")
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    argv = ["launch", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", accelerator,
            "--num_slices", str(slices), "--", *TRAIN.split(), *override]
    code, out, err = run_main(tpu.main, argv, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0] and accelerator in err[0]
    assert err[0].startswith("gqlm launch: error: ")
    assert not calls.exists()  # gcloud was never called: nothing was created


def test_tpu_missing_gcloud(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud anywhere
    code, out, err = run_main(tpu.main, ["create", "--name", "n", "--zone", "z", "--project", "p",
                                         "--accelerator_type", "v4-8"], capsys)
    assert code == 2 and len(err) == 1 and "gcloud not found" in err[0]


def test_tpu_missing_project(tmp_path, monkeypatch, capsys):
    bin_dir, calls = fake_gcloud(tmp_path, project="")
    monkeypatch.setenv("PATH", bin_dir)
    code, out, err = run_main(tpu.main, ["create", "--name", "n", "--zone", "z", "--accelerator_type", "v4-8"], capsys)
    assert code == 2 and len(err) == 1 and "no GCP project" in err[0]
    assert calls.read_text().splitlines() == ["config get-value project"]  # asked, created nothing


@pytest.mark.parametrize("argv, needle", [
    (["run", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", "v4-8", "--dry_run"],
     "after `--`"),
    (["launch", "--name", "n", "--zone", "z", "--project", "p", "--dry_run", "--", "x"], "--accelerator_type"),
    (["create", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", "v4-8", "--queued",
      "--preemptible", "--dry_run"], "--spot"),
    (["create", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", "v5p-3", "--dry_run"],
     "whole number"),
    (["create", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", "v4-8", "--queued",
      "--wait_timeout", "10 minutes", "--dry_run"], "--wait_timeout"),
    (["create", "--name", "n", "--zone", "z", "--project", "p", "--accelerator_type", "v4-8",
      "--valid_until_duration", "6x", "--dry_run"], "--valid_until_duration"),
    (["status", "--name", "Bad_Name", "--zone", "z", "--project", "p", "--dry_run"], "--name"),
    (["status", "--name", "n", "--zone", "z", "--project", "p", "--remote_dir", "../x", "--dry_run"], "--remote_dir"),
])
def test_tpu_bad_arguments(capsys, argv, needle):
    code, out, err = run_main(tpu.main, argv, capsys)
    assert code == 2 and out == [] and len(err) == 1 and needle in err[0]


# ----------------------------------------------------------------------------- Slurm


def test_slurm_dry_run_renders_the_script(tmp_path, capsys):
    argv = ["--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu", "--account", "lab", "--time", "12:00:00",
            "--sbatch=--qos=high", "--log_dir", str(tmp_path / "logs"), "--dry_run", "--",
            "python", "-m", "gqlm.train", "--config", "experiments/tiny_cpu.py", "--workdir", "/shared/run 1"]
    code, out, err = run_main(gpu_slurm.main, argv, capsys)
    assert (code, err) == (0, [])
    expected = f"""#!/bin/bash
# gqlm on a Slurm GPU cluster: 2 node(s) x 4 GPU(s), one task (JAX process) per GPU.
# Rendered by launch/gpu_slurm.py from launch/gpu_slurm.sbatch; every ${{...}} below is for the shell.
#SBATCH --job-name=gqlm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output={tmp_path}/logs/gqlm-%j.out
#SBATCH --partition=gpu
#SBATCH --account=lab
#SBATCH --qos=high
set -euo pipefail
cd {ROOT}
source {ROOT}/.venv/bin/activate
# gqlm.distributed.maybe_initialize() reads SLURM_* (jax's Slurm detection): the coordinator is
# the first node, each task drives the GPU of its SLURM_LOCALID.
export GQLM_INIT_TIMEOUT=${{GQLM_INIT_TIMEOUT:-600}}
# The launcher's XLA GPU flags (--xla_flags), then the submitting shell's own: a later flag wins.
export XLA_FLAGS="{gpu_slurm.GPU_XLA_FLAGS} ${{XLA_FLAGS:-}}"
# Slurm 22.05-23.02 srun does not inherit --cpus-per-task from sbatch: pass it again.
srun --kill-on-bad-exit=1 --cpus-per-task=8 python -m gqlm.train --config experiments/tiny_cpu.py --workdir '/shared/run 1'
"""
    assert "\n".join(out) + "\n" == expected
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_the_slurm_gpu_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts at start-up on an unknown flag: a renamed or removed one would kill every job."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": gpu_slurm.GPU_XLA_FLAGS}
    result = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; print(jax.jit(jnp.sin)(1.0))"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Unknown flag" not in result.stderr, result.stderr[-500:]
    bad = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(jnp.sin)(1.0)"],
                         env={**env, "XLA_FLAGS": "--xla_gpu_no_such_flag=true"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr  # the check above can fail


def test_slurm_options_keep_their_dollars(tmp_path, capsys):
    argv = ["--nodes", "1", "--gpus_per_node", "2", "--cpus_per_task", "6", "--sbatch=--comment=run_${USER}",
            "--sbatch=--mail-user=$USER@x", "--log_dir", str(tmp_path), "--dry_run", "--", "python", "-c", "1"]
    code, out, err = run_main(gpu_slurm.main, argv, capsys)
    assert (code, err) == (0, [])
    assert "#SBATCH --comment=run_${USER}" in out and "#SBATCH --mail-user=$USER@x" in out
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=6 python -c 1" in out
    code, _, err = run_main(gpu_slurm.main, ["--nodes", "1", "--gpus_per_node", "1", "--sbatch=--qos=a\nrm -rf x",
                                             "--dry_run", "--", "x"], capsys)
    assert code == 2 and len(err) == 1 and "--sbatch" in err[0]


def test_slurm_xla_flags_are_overridable_and_checked(tmp_path, capsys):
    base = ["--nodes", "1", "--gpus_per_node", "1", "--log_dir", str(tmp_path), "--dry_run"]
    code, out, _ = run_main(gpu_slurm.main, base + ["--xla_flags=--xla_gpu_enable_triton_gemm=false", "--",
                                                    "python", "-c", "1"], capsys)
    assert code == 0 and 'export XLA_FLAGS="--xla_gpu_enable_triton_gemm=false ${XLA_FLAGS:-}"' in out
    code, _, err = run_main(gpu_slurm.main, base + ["--xla_flags=--a=1 $(rm -rf x)", "--", "python"], capsys)
    assert code == 2 and len(err) == 1 and "--xla_flags" in err[0]


def test_slurm_config_that_does_not_fit(capsys):
    argv = ["--nodes", "2", "--gpus_per_node", "8", "--dry_run", "--", *TRAIN.split()]
    code, _, err = run_main(gpu_slurm.main, argv, capsys)
    assert code == 2 and len(err) == 1 and "16 devices" in err[0] and "mesh" in err[0]


def test_slurm_without_sbatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["--nodes", "1", "--gpus_per_node", "8", "--log_dir", str(tmp_path / "logs"), "--", *TRAIN.split()]
    code, _, err = run_main(gpu_slurm.main, argv, capsys)
    assert code == 2 and len(err) == 1 and "sbatch not found" in err[0]
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- plain multi-node, local


def test_multinode_dry_run_and_bad_id(capsys):
    base = ["--coordinator", "10.1.2.3:1234", "--num_processes", "4"]
    code, out, _ = run_main(multinode.main, base + ["--process_id", "3", "--dry_run", "--", "python", "-m", "x"],
                            capsys)
    assert (code, out) == (0, ["GQLM_COORDINATOR_ADDRESS=10.1.2.3:1234 GQLM_NUM_PROCESSES=4 GQLM_PROCESS_ID=3 "
                               "python -m x"])
    code, _, err = run_main(multinode.main, base + ["--process_id", "4", "--", "python"], capsys)
    assert code == 2 and len(err) == 1 and "GQLM_PROCESS_ID=4" in err[0]
    code, _, err = run_main(multinode.main, ["--coordinator", "nohost", "--num_processes", "2", "--process_id", "0",
                                             "--", "python"], capsys)
    assert code == 2 and "host:port" in err[0]


def test_local_environments():
    envs = local.process_environments(3, 2, 4242, base={"XLA_FLAGS": "--xla_foo=1 "
                                                        "--xla_force_host_platform_device_count=8", "A": "b"})
    assert [e["GQLM_PROCESS_ID"] for e in envs] == ["0", "1", "2"]
    for e in envs:
        assert e["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
        assert (e["GQLM_COORDINATOR_ADDRESS"], e["GQLM_NUM_PROCESSES"], e["A"]) == ("127.0.0.1:4242", "3", "b")


def test_local_prefixes_output_and_stops_the_others_on_failure(tmp_path):
    marker = tmp_path / "survived"
    script = ("import os, sys, time\n"
              "i = int(os.environ['GQLM_PROCESS_ID'])\n"
              "print('hello from', i, os.environ['XLA_FLAGS'].split('=')[-1], flush=True)\n"
              "if i == 1: sys.exit(7)\n"
              f"time.sleep(60); open({str(marker)!r}, 'w').close()\n")
    result = subprocess.run([sys.executable, "launch/local.py", "--num_processes", "3", "--devices_per_process", "2",
                             "--", sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 7
    assert sorted(result.stdout.splitlines()) == ["[0] hello from 0 2", "[1] hello from 1 2", "[2] hello from 2 2"]
    assert "process 1 exited with code 7" in result.stderr
    assert not marker.exists()  # processes 0 and 2 were stopped, not waited for


@pytest.mark.parametrize("ids, expected", [("", None), ("2,3", [2, 3])])
def test_explicit_processes_turn_off_jax_cluster_detection(monkeypatch, ids, expected):
    """Under srun/mpirun, jax's own detection would give each process one GPU; gqlm's plan is explicit."""
    import jax
    from gqlm import distributed
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    advertised = []
    monkeypatch.setattr(distributed, "_advertise_gloo_address", advertised.append)
    env = {"GQLM_COORDINATOR_ADDRESS": "10.0.0.1:1234", "GQLM_NUM_PROCESSES": "2", "GQLM_PROCESS_ID": "0",
           "GQLM_LOCAL_DEVICE_IDS": ids, "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    distributed.maybe_initialize(5)
    [(args, kwargs)] = calls
    assert args == ("10.0.0.1:1234", 2, 0)
    assert kwargs["cluster_detection_method"] == "deactivate" and kwargs["local_device_ids"] == expected
    assert advertised == [a for a in [distributed.route_address("10.0.0.1:1234")] if a]


def test_gloo_advertises_the_address_on_the_route_to_the_coordinator():
    """Not what the hostname resolves to: in some containers that address is unreachable (CI saw it)."""
    from gqlm.distributed import route_address
    assert route_address("127.0.0.1:1234") == "127.0.0.1"
    assert route_address("localhost:1234") in ("127.0.0.1", "::1")
    assert route_address("no-such-host.invalid:1234") is None


def test_local_launcher_killed_stops_its_processes(tmp_path):
    """SIGTERM to the launcher (e.g. a scheduler ending it) must not orphan the processes it started:
    they run in their own sessions, so only the launcher can stop them."""
    pids = tmp_path / "pids"
    script = f"import os, time\nopen({str(pids)!r} + os.environ['GQLM_PROCESS_ID'], 'w').write(str(os.getpid()))\n" \
             "time.sleep(120)\n"
    launcher = subprocess.Popen([sys.executable, "launch/local.py", "--num_processes", "2", "--",
                                 sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children = []
    for _ in range(300):
        children = [int(p.read_text()) for p in tmp_path.glob("pids*") if p.read_text()]
        if len(children) == 2:
            break
        time.sleep(0.1)
    assert len(children) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM  # as a shell reports a TERM-killed job
    for pid in children:
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"process {pid} outlived the launcher")


def test_local_missing_command_and_taken_port_are_one_line_errors(capsys):
    code, out, err = run_main(local.main, ["--num_processes", "2", "--", "no_such_command_gqlm"], capsys)
    assert code == 2 and len(err) == 1 and "'no_such_command_gqlm'" in err[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_main(local.main, ["--num_processes", "2", "--port", str(port), "--", "true"], capsys)
    assert code == 2 and len(err) == 1 and f"--port={port}" in err[0]


def test_leading_assignments_stay_assignments_in_the_remote_shell_line(tmp_path):
    """`-- XLA_FLAGS='--a --b' python ...`: shlex.join alone made bash run 'XLA_FLAGS=...' as a command."""
    from launch.common import shell_command
    line = shell_command(["XLA_FLAGS=--a --b", "N=1", sys.executable, "-c", "import os; print(os.environ['XLA_FLAGS'])"])
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True).stdout
    assert out == "--a --b\n"
    assert shell_command(["python", "A=b"]) == "python A=b"  # an argument that looks like one is left alone
