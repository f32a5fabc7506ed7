"""launch/tpu.py against a fake `gcloud` that runs every ssh and scp here, one directory per worker.

The fake (first on PATH) records each call; `ssh` runs the remote command with HOME set to the
worker's directory, so detached jobs, logs and exit markers are real files and processes.
A 2-worker "pod" trains the smoke config through the real launcher, with the ssh that follows the
log dropped mid-run; queued resources fail, time out or cannot be described; a preempted TPU is
left for the user and replaced by `create --recreate`; `stop`, `status` and stale-process cleanup.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from launch import tpu, tpu_job, tpu_resource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_GCLOUD = r'''
import glob, json, os, shutil, subprocess, sys, threading
root = os.environ["FAKE_ROOT"]
argv = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
words = [a for a in argv if not a.startswith("--")]
flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv if a.startswith("--"))
state_dir = os.path.join(root, "state")
os.makedirs(state_dir, exist_ok=True)

def state(name, value=None):
    path = os.path.join(state_dir, name)
    if value is not None:
        with open(path, "w") as f:
            f.write(value)
    return open(path).read() if os.path.exists(path) else None

def make_node(node):
    for i in range(int(os.environ.get("FAKE_WORKERS", "2"))):
        os.makedirs(os.path.join(root, "pods", node, f"w{i}"), exist_ok=True)
    state(node, "READY")

def not_found(name):
    sys.exit(print(f"ERROR: (gcloud) NOT_FOUND: {name}", file=sys.stderr) or 1)

def relay(proc, drop_after):
    lines = 0
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines += 1
        if lines == drop_after:  # the network drops: the local ssh ends, the remote side is killed
            proc.kill()
            return 255
    return proc.wait()

def ssh(node, worker, command):
    if state(node) != "READY":
        sys.exit(print("ssh: connect to host: Connection timed out", file=sys.stderr) or 255)
    dirs = sorted(glob.glob(os.path.join(root, "pods", node, "w*")))
    chosen = list(enumerate(dirs)) if worker == "all" else [(int(worker), dirs[int(worker)])]
    drop = os.path.join(root, "drop_follow")
    drop_after = int(open(drop).read()) if "tail -n" in command and os.path.exists(drop) else 0
    if drop_after:
        os.unlink(drop)
    procs = []
    for i, d in chosen:
        extra = {k: v.replace("{i}", str(i)) for k, v in json.loads(os.environ.get("FAKE_WORKER_ENV", "{}")).items()}
        procs.append(subprocess.Popen(["bash", "-c", command], cwd=d, env={**os.environ, **extra, "HOME": d},
                                      stdout=subprocess.PIPE, text=True))
    codes = [relay(p, drop_after) for p in procs]
    sys.exit(max(codes))

kind, verb, name = words[2:5] if len(words) >= 5 else ("", "", "")
if words[:3] == ["config", "get-value", "project"]:
    print(os.environ.get("FAKE_PROJECT", ""))
elif (kind, verb) == ("tpu-vm", "create"):
    if state(name):
        sys.exit(print(f"ERROR: (gcloud) ALREADY_EXISTS: {name}", file=sys.stderr) or 1)
    make_node(name)
elif (kind, verb) == ("queued-resources", "create"):
    state(name + ".queue", json.dumps(os.environ["FAKE_QUEUE"].split(",")))
elif (kind, verb) == ("queued-resources", "describe"):
    queue = json.loads(state(name + ".queue") or "null") or not_found(name)
    current = queue.pop(0) if len(queue) > 1 else queue[0]
    state(name + ".queue", json.dumps(queue))
    if current == "DESCRIBE_ERROR":
        sys.exit(print("ERROR: (gcloud) backend unavailable", file=sys.stderr) or 1)
    if current == "ACTIVE":
        make_node(flags["node-id"] if "node-id" in flags else name)
    failed = {"failedData": {"error": {"code": 8, "message": "no v4 capacity in zone"}}} if current == "FAILED" else {}
    print(json.dumps({"state": {"state": current, **failed}}))
elif (kind, verb) == ("tpu-vm", "describe"):
    current = state(name) or not_found(name)
    print(current if flags["format"].startswith("value") else json.dumps({"state": current}))
elif verb == "delete":
    for path in glob.glob(os.path.join(state_dir, name + "*")):
        os.unlink(path)
elif (kind, verb) == ("tpu-vm", "scp"):
    node, dest = words[5].split(":")
    for d in sorted(glob.glob(os.path.join(root, "pods", node, "w*"))):
        shutil.copy(name, os.path.join(d, dest))
elif (kind, verb) == ("tpu-vm", "ssh"):
    ssh(name, flags["worker"], flags["command"])
else:
    sys.exit(print(f"fake gcloud: unknown call {argv}", file=sys.stderr) or 2)
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pod(tmp_path, monkeypatch):
    """The fake gcloud on PATH, fast polling; returns (root, calls(), env setter)."""
    monkeypatch.chdir(ROOT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ROOT", str(tmp_path))
    monkeypatch.setenv("FAKE_PROJECT", "proj")
    for module, name, value in [(tpu_job, "POLL_S", 0.2), (tpu_resource, "QUEUED_POLL_S", 0.05),
                                (tpu_job, "STOP_GRACE_S", 5),
                                (tpu_job, "LIBTPU_LOCKFILE", str(tmp_path / "libtpu_lockfile"))]:
        monkeypatch.setattr(module, name, value)

    def calls():
        path = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return tmp_path, calls


def verbs(calls):
    """`tpu-vm create`, `ssh worker=all`, ... for each gcloud call, `config` calls left out."""
    out = []
    for argv in calls:
        if argv[0] == "config":
            continue
        worker = [a.split("=")[1] for a in argv if a.startswith("--worker=")]
        out.append(f"{argv[2]} {argv[3]}" + (f" worker={worker[0]}" if argv[3] == "ssh" else ""))
    return out


def run(argv, capfd):
    try:
        code = tpu.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def base(name, root, accelerator="v4-16"):
    return ["--name", name, "--zone", "z", "--accelerator_type", accelerator, "--log_file", str(root / f"{name}.log")]


@pytest.mark.slow
def test_pod_trains_through_a_dropped_ssh_and_is_deleted_last(pod, monkeypatch, capfd):
    root, calls = pod
    monkeypatch.setenv("FAKE_WORKER_ENV", json.dumps({
        "GQLM_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "GQLM_NUM_PROCESSES": "2", "GQLM_PROCESS_ID": "{i}",
        "GQLM_INIT_TIMEOUT": "120", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
    (root / "drop_follow").write_text("3")  # the ssh following the log drops after 3 lines
    workdir = root / "workdir"
    argv = ["launch", *base("pod", root), "--setup_command", f"ln -sfn {ROOT}/.venv .venv", "--",
            "python", "-m", "gqlm.train", "--config", "experiments/tiny_cpu.py:smoke", "--config.train.steps=4",
            "--config.train.log_every=1", "--config.train.eval_every=4", "--config.train.sample_tokens=0",
            "--workdir", str(workdir)]
    code, out, err = run(argv, capfd)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "connection to pod lost (ssh exit code 255; job running); reattaching" in err
    assert not (root / "drop_follow").exists()  # the drop did happen
    sequence = verbs(calls())
    assert sequence[:4] == ["tpu-vm create", "tpu-vm scp", "tpu-vm ssh worker=all", "tpu-vm ssh worker=all"]
    assert sequence.count("tpu-vm ssh worker=0") >= 2 and sequence[-1] == "tpu-vm delete"  # reattached; delete last
    worker_log = (root / "pods" / "pod" / "w0" / "gqlm" / "logs" / "pod.log").read_text()
    assert "step 4" in worker_log and (root / "pod.log").read_text() == worker_log  # every line once, in order
    for w in ("w0", "w1"):
        assert (root / "pods" / "pod" / w / "gqlm" / "logs" / "pod.exit").read_text().strip() == "0"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]  # both workers trained as one job


@pytest.mark.parametrize("queue, needle", [
    ("WAITING_FOR_RESOURCES,FAILED", "is FAILED: no v4 capacity in zone"),
    ("WAITING_FOR_RESOURCES,DESCRIBE_ERROR", "cannot describe queued resource qr (3 tries): ERROR: (gcloud) backend"),
    ("WAITING_FOR_RESOURCES", "not ACTIVE after 1 s (state WAITING_FOR_RESOURCES)"),
])
def test_queued_resource_that_never_comes_is_deleted(pod, monkeypatch, capfd, queue, needle):
    root, calls = pod
    monkeypatch.setenv("FAKE_QUEUE", queue)
    code, out, err = run(["launch", *base("qr", root), "--queued", "--wait_timeout", "1s", "--", "true"], capfd)
    assert code == 1 and needle in err, err
    sequence = verbs(calls())
    assert sequence[0] == "queued-resources create" and sequence[-1] == "queued-resources delete"
    assert "tpu-vm scp" not in sequence


def start_node(root, name):
    """A READY node whose workers have the repository's venv (what `setup` leaves)."""
    for i in range(2):
        (root / "pods" / name / f"w{i}" / "gqlm").mkdir(parents=True)
        os.symlink(f"{ROOT}/.venv", root / "pods" / name / f"w{i}" / "gqlm" / ".venv")
    (root / "state").mkdir(exist_ok=True)
    (root / "state" / name).write_text("READY")


def test_env_value_with_spaces_reaches_the_job(pod, capfd):
    root, calls = pod
    start_node(root, "envs")
    code, out, err = run(["run", *base("envs", root), "--env", "LIBTPU_INIT_ARGS=--a=1 --b=2", "--env", "EMPTY=",
                          "--", "python", "-c", "import os; print(repr(os.environ['LIBTPU_INIT_ARGS']), "
                                                "repr(os.environ['EMPTY']), os.environ['GQLM_DISTRIBUTED'])"],
                         capfd)
    assert code == 0, err
    assert "'--a=1 --b=2' '' auto\n" in out
    assert "tpu-vm delete" not in verbs(calls())  # `run` never deletes


def test_stop_status_busy_and_stale_processes(pod, capfd):
    root, calls = pod
    start_node(root, "st")
    lock = root / "libtpu_lockfile"
    lock.write_text("")
    stale = subprocess.Popen(["sleep", "60"], stdin=open(lock))  # a leftover process holding libtpu's lock
    t = tpu.Tpu("st", "z", "proj", "v4-16")
    job = ["python", "-c", "import time; print('up', flush=True); time.sleep(60)"]
    tpu_job.start(t, job, [])
    assert stale.wait(timeout=10) == -9 and not lock.exists()  # cleaned before the run
    with pytest.raises(RuntimeError, match="still running on st"):
        tpu_job.start(t, job, [])  # a second job of the same name does not start over the first
    capfd.readouterr()
    code, out, _ = run(["status", "--name", "st", "--zone", "z"], capfd)
    assert code == 0 and out.count("gqlm-job") == 2 and out.splitlines()[-1] == "job st: running"
    code, out, _ = run(["stop", "--name", "st", "--zone", "z"], capfd)
    assert code == 0 and out.count(": exited 143") == 2
    code, out, _ = run(["status", "--name", "st", "--zone", "z"], capfd)
    assert out.splitlines()[-1] == "job st: ended, exit code 143"
    code, out, _ = run(["logs", "--name", "st", "--zone", "z", "--log_file", str(root / "st.log")], capfd)
    assert code == 143 and out.startswith("up\n")


def test_preempted_tpu_is_kept_then_recreated_on_request(pod, capfd):
    root, calls = pod
    preempt = f"print('step 1', flush=True); open({str(root / 'state' / 'pre')!r}, 'w').write('PREEMPTED')"
    code, out, err = run(["launch", *base("pre", root), "--setup_command", f"ln -sfn {ROOT}/.venv .venv", "--",
                          "python", "-c", preempt], capfd)
    assert code == 1 and "TPU VM pre PREEMPTED: the job on it is lost" in err, err
    assert "nothing was deleted" in err and "python launch/tpu.py logs   --name pre --zone z --project proj" in err
    assert "tpu-vm delete" not in verbs(calls())  # the lost ssh deleted nothing
    code, out, err = run(["create", *base("pre", root)], capfd)
    assert code == 1 and "add --recreate" in err  # gcloud's own error, and a hint; nothing deleted
    code, out, err = run(["create", *base("pre", root), "--recreate"], capfd)
    assert code == 0 and "pre is PREEMPTED: deleting it before creating it again" in out
    assert verbs(calls())[-4:] == ["tpu-vm create", "tpu-vm describe", "tpu-vm delete", "tpu-vm create"]
    assert (root / "state" / "pre").read_text() == "READY"


def test_stop_reaches_every_slice_when_one_ssh_fails(pod, capfd):
    """`stop` on a multi-slice job whose first slice cannot be reached still stops the second."""
    root, calls = pod
    start_node(root, "ms-1")
    (root / "state" / "ms-0").write_text("PREEMPTED")  # the fake's ssh to it fails (exit 255)
    t = tpu.Tpu("ms", "z", "proj", "v4-16", num_slices=2, queued=True)
    start = tpu_job.start_script(t, ["python", "-c", "import time; time.sleep(60)"], [])
    assert "started" in subprocess.run(tpu.tpu_gcloud.ssh(t, "ms-1", start), capture_output=True, text=True).stdout
    capfd.readouterr()
    code, out, err = run(["stop", "--name", "ms", "--zone", "z", "--num_slices", "2"], capfd)
    assert code == 255  # the first failure is reported ...
    assert [v for v in verbs(calls()) if v.endswith("ssh worker=all")][-2:] == ["tpu-vm ssh worker=all"] * 2
    assert out.count(": exited 143") == 2  # ... and both workers of ms-1 were stopped anyway
    for i in range(2):
        assert (root / "pods" / "ms-1" / f"w{i}" / "gqlm" / "logs" / "ms.exit").read_text().strip() == "143"


def test_logs_of_a_worker_that_cannot_be_read_gives_up(pod, capfd, monkeypatch):
    """A follow ssh that fails every time while the job runs must end, not loop forever."""
    root, calls = pod
    start_node(root, "lw")
    t = tpu.Tpu("lw", "z", "proj", "v4-16")
    tpu_job.start(t, ["python", "-c", "import time; time.sleep(60)"], [])
    monkeypatch.setattr(tpu_job, "REATTACH_TRIES", 3)
    try:
        with pytest.raises(tpu_job.JobNotEnded, match="cannot read worker 5"):
            tpu_job.follow(t, [], None, worker=5)  # the fake has workers 0 and 1: its ssh fails
    finally:
        tpu_job.stop(t)
    capfd.readouterr()
    code, out, err = run(["logs", "--name", "lw", "--zone", "z", "--accelerator_type", "v4-16", "--worker", "2"],
                         capfd)
    assert code == 2 and "--worker=2" in err and "= 2" in err  # v4-16: 2 workers
