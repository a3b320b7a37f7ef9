"""End to end on a pure cgroup v2 kernel: the installed ``taskman-server``
(this venv's bin/, as tox installs it) started inside the VM as a service
would be (alone in a fresh cgroup), on a loopback port with mTLS and the
shipped certificates, and the installed ``taskman`` CLI driving it: start,
get-status, stream, stop, and an OOM kill reported with source ``oom``.

The state directory is on the VM's disk /dev/vda (254:0). The server is given
``--io-device`` for it: its default IO devices are those backing ``/`` and
the state directory, and the VM's ``/`` is an overlay over 9p with no block
device (the server refuses to start rather than run without an IO limit).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import guest
import pytest

from support import poll_for

guest.require_pure_v2(__name__)

from taskman.cgroups import detect

pytestmark = pytest.mark.timeout(300)

ROOT = "taskman"
# Tasks run as an unprivileged uid: they cannot run a virtualenv's python under /root.
PYTHON = "/usr/bin/python3"
USER = "client001"
COLUMNS = ["TASK ID", "START TIME", "PID", "STATUS", "EXIT CODE", "SIGNAL", "SOURCE",
           "END TIME"]


def installed(name):
    """The program next to this python (the tox venv's bin/), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which(name)


SERVER, CLI = installed("taskman-server"), installed("taskman")
if not (SERVER and CLI):
    missing = [name for name, path in (("taskman-server", SERVER), ("taskman", CLI)) if not path]
    reason = (f"{' and '.join(missing)} not installed (next to {sys.executable} or on PATH): "
              "install the package (tox -e cgroupv2 does)")
    print(f"test_server_e2e: skipped: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture
def server(delegated, state_dir, session_pki):
    """taskman-server alone in a fresh group <own>/e2e-<pid>, with a copy of the
    run's PKI in its state directory; SIGTERM at the end must exit 0 and leave
    no task group behind."""
    own, _ = delegated
    session_pki.copy_to(os.path.join(state_dir, "pki"))
    service = f"{own}/e2e-{os.getpid()}"
    os.mkdir(service)
    device = detect.backing_devices([state_dir])[0]
    log_path = os.path.join(state_dir, "..", f"server-{os.getpid()}.log")
    command = [SERVER, "--server-address", "127.0.0.1:0", "--state-dir", state_dir,
               "--cgroup-driver", "auto", "--cgroup-root", ROOT, "--io-device", device,
               "--memory-max", "64M", "--stop-grace", "1"]
    with open(log_path, "wb") as log:
        # Join the group first, then become the server: it never runs elsewhere.
        process = subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"',
                                    service, *command], stdout=log, stderr=subprocess.STDOUT)

    def text():
        with open(log_path, errors="replace") as log:
            return log.read()

    def listening():
        if process.poll() is not None:
            raise AssertionError(f"taskman-server exited {process.returncode}:\n{text()}")
        return re.search(r"listening on 127\.0\.0\.1:(\d+)", text())

    started = time.monotonic()
    port = int(poll_for(listening, timeout=180, message="taskman-server to listen").group(1))
    print(f"taskman-server listening after {time.monotonic() - started:.1f}s")
    try:
        yield {"address": f"127.0.0.1:{port}", "pid": process.pid, "service": service,
               "log": text, "certs": os.path.join(state_dir, "pki")}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = "hung on SIGTERM"
        print(text())
        left = [name for name in os.listdir(f"{service}/{ROOT}")
                if os.path.isdir(f"{service}/{ROOT}/{name}") and name != "server"]
        guest.remove_tree(service)
        assert status == 0, f"taskman-server: {status}"
        assert not left, f"task groups left after the server stopped: {left}"


def taskman(server, *args, timeout=120):
    """Run the CLI against ``server``; return (exit status, stdout, stderr)."""
    command, rest = args[0], list(args[1:])
    options = ["--user-id", USER, "--server-address", server["address"]]
    if command == "start":
        argv = [CLI, "start", *options, "--", *rest]
    else:
        argv = [CLI, command, *rest, *options]
    # The client bundles in the server's own state directory.
    env = {**os.environ, "TASKMAN_CERTS_DIR": server["certs"]}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    return result.returncode, result.stdout, result.stderr


def start(server, *command):
    status, out, err = taskman(server, "start", *command)
    assert status == 0, err
    return out.split()[-1]


def get_status(server, task_id):
    """get-status's one row as {column: cell}."""
    status, out, err = taskman(server, "get-status", task_id)
    assert status == 0, err
    header, _, row = out.rstrip("\n").split("\n")
    starts = [header.index(name) for name in COLUMNS]
    ends = starts[1:] + [None]
    return {name: row[begin:end].strip() for name, begin, end in zip(COLUMNS, starts, ends, strict=True)}


def ended(server, task_id, timeout=120):
    return poll_for(lambda: (lambda row: row if row["STATUS"] != "JOB_STATUS_STARTED" else None)(
        get_status(server, task_id)), timeout=timeout, interval=0.5,
        message=f"task {task_id} to end")


def test_server_and_cli_on_cgroup_v2(server):
    service = server["service"]
    base = f"{service}/{ROOT}"
    # The server moved itself into its leaf; task groups get the controllers.
    assert guest.relative_cgroup(server["pid"]) == f"{base[len(guest.CG_ROOT):]}/server"
    assert guest.procs(service) == []
    assert set(guest.NEEDED) <= set(guest.read(f"{base}/cgroup.subtree_control").split())
    assert "cgroup driver v2" in server["log"]()

    # start, get-status of a running task, in its own group with the limits
    task_id = start(server, "sh", "-c", "echo started; setsid sleep 1000 & sleep 1000")
    row = get_status(server, task_id)
    assert row["STATUS"] == "JOB_STATUS_STARTED"
    pid = int(row["PID"])
    group = guest.task_group(base, task_id)
    assert guest.relative_cgroup(pid) == group[len(guest.CG_ROOT):]
    assert guest.read(f"{group}/memory.max").strip() == str(64 << 20)
    assert guest.read(f"{group}/cpu.max").split() == ["200000", "1000000"]
    poll_for(lambda: len(guest.procs(group)) == 3, timeout=30, message="the task's 3 processes")
    tree = guest.procs(group)

    # stop: every process of the group, including the setsid one, is gone
    status, out, err = taskman(server, "stop", task_id)
    assert status == 0, err
    row = ended(server, task_id)
    assert (row["STATUS"], row["SOURCE"]) == ("JOB_STATUS_SIGNALED", "user"), row
    assert row["SIGNAL"] in ("SIGTERM", "SIGKILL"), row
    assert not [p for p in tree if os.path.exists(f"/proc/{p}")
                and guest.read(f"/proc/{p}/stat").rsplit(")", 1)[1].split()[0] != "Z"]
    poll_for(lambda: not os.path.exists(group), timeout=30, message="the task group to go")

    # stream: the whole output of a task, then the end
    task_id = start(server, "sh", "-c", "for i in 1 2 3; do echo line $i; done")
    status, out, err = taskman(server, "stream", task_id)
    assert (status, out) == (0, "line 1\nline 2\nline 3\n"), err
    assert ended(server, task_id)["STATUS"] == "JOB_STATUS_EXITED_OK"

    # memory.max 64M: the kernel's OOM killer, reported as such
    task_id = start(server, PYTHON, "-c", "data = b'x' * (256 << 20)")
    row = ended(server, task_id)
    assert (row["STATUS"], row["SIGNAL"], row["SOURCE"]) == ("JOB_STATUS_SIGNALED", "SIGKILL",
                                                             "oom"), row
    # An emptied user slice is kept a moment for its user's next task
    # (task_groups.SLICE_LINGER), then removed: only the server's leaf stays.
    poll_for(lambda: [name for name in os.listdir(base) if os.path.isdir(f"{base}/{name}")]
             == ["server"], timeout=30, message="only the server's leaf left")


def test_tasks_are_sandboxed_on_cgroup_v2(server, state_dir):
    """The sandbox on a pure v2 kernel: an unprivileged uid that can neither
    leave its group nor kill another task's, nor read the server's state."""
    base = f"{server['service']}/{ROOT}"
    victim = start(server, "sh", "-c", "echo alive; exec sleep 1000")
    victim_group = guest.task_group(base, victim)
    poll_for(lambda: len(guest.procs(victim_group)) == 1, timeout=30, message="the victim to start")
    script = (f"id -u; echo $$ > {guest.CG_ROOT}/cgroup.procs; echo $$ > {base}/cgroup.procs;"
              f" echo $$ > {server['service']}/cgroup.procs; echo 1 > {victim_group}/cgroup.kill;"
              f" echo max > {victim_group}/memory.max; echo 1 > {victim_group}/cgroup.freeze;"
              f" cat {state_dir}/tasks.db; cat {state_dir}/pki/server.key; kill -0 {server['pid']};"
              " cat /proc/self/cgroup")
    attacker = start(server, "sh", "-c", script)
    row = ended(server, attacker)
    status, out, err = taskman(server, "stream", attacker)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].isdigit() and lines[0] != "0", out
    assert out.count("Permission denied") >= 6, out
    assert "PRIVATE KEY" not in out and "SQLite" not in out, out
    assert any(line.startswith(f"0::{base[len(guest.CG_ROOT):]}/") and line.endswith(f"/{attacker}")
               for line in lines), out  # still in its own group (in its user's slice)
    assert row["STATUS"] == "JOB_STATUS_EXITED_OK", row  # its last command, cat, succeeds
    assert get_status(server, victim)["STATUS"] == "JOB_STATUS_STARTED"
    assert guest.read(f"{victim_group}/memory.max").strip() == str(64 << 20)
    assert guest.read(f"{victim_group}/cgroup.freeze").strip() == "0"
    status, out, err = taskman(server, "stop", victim)
    assert status == 0, err
    assert ended(server, victim)["SOURCE"] == "user"
    status, out, err = taskman(server, "stream", victim)
    assert out == "alive\n", out
