"""The attack suite: a real server and the real CLI, two users.

Every attack of docs/security.md's table is run as client001 (a task of its
own) against client002's task and against the server, and each test asserts
both that the attack failed and that nothing changed: client002's task ends
with its output byte-exact, the store's records are unchanged after a
restart, the limits still apply, the server is alive and a stop still works.

Tasks run programs any uid can run (/bin/sh, /usr/bin/python3), never this
interpreter (a virtualenv under /root, mode 0700). The server's directory
lives where tasks can reach it (support.task_visible_tempdir), not /tmp or
/dev/shm: tasks get a tmpfs of their own on both, and the attacks must reach
the real state directory to be refused by it.
"""

import glob
import json
import os
import shutil
import signal
import textwrap
from pathlib import Path

import pytest
from server_harness import DRIVER, Cli, Server, wait_for

from support import task_visible_tempdir

PYTHON = "/usr/bin/python3"
SECRET = "client002-secret-" + os.urandom(8).hex()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tasks change uid only under a root server"),
    pytest.mark.skipif(not os.access(PYTHON, os.X_OK), reason=f"{PYTHON} is missing"),
]

# client002's task: says its secret, makes a file in its private /tmp, and on
# SIGTERM says whether anything else appeared there, then exits 0.
VICTIM = textwrap.dedent(f"""
    import os, signal, sys, time
    def stop(number, frame):
        print("planted:", sorted(set(os.listdir("/tmp")) - {{"victim-file"}}), flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    open("/tmp/victim-file", "w").write("{SECRET}")
    print("{SECRET}", flush=True)
    while True:
        time.sleep(1)
""")
VICTIM_OUTPUT = f"{SECRET}\nplanted: []\n".encode()
WORLD_WRITABLE = [path for path in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(path)]


class World:
    """The server, the CLI, client002's running task, and what must not change."""

    def __init__(self, root: Path):
        root.chmod(0o755)
        self.root = root
        self.server = Server(root / "server").start()
        self.cli = Cli(self.server)
        self.state = self.server.state_dir
        self.cgroup_root = self.server.command[self.server.command.index("--cgroup-root") + 1]
        self.victim = self.cli.start_id("client002", PYTHON, "-c", VICTIM)
        wait_for(lambda: SECRET.encode() in self.output(self.victim, "client002"),
                 message="client002's task to print its secret")
        self.victim_pid = int(self.cli.status_row(self.victim, "client002")["PID"])

    def output(self, task_id: str, user: str = "client001") -> bytes:
        result = self.cli.run("stream", task_id, "--no-follow", user=user)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def attack(self, script: str, program: str = "/bin/sh") -> tuple:
        """Run ``script`` as client001's task; return (exit code, output text)."""
        task_id = self.cli.start_id("client001", program, "-c", script)
        row = self.cli.wait_ended(task_id)
        return int(row["EXIT CODE"]), self.output(task_id).decode(errors="replace")

    def group_files(self, task_id: str, name: str) -> list:
        return glob.glob(f"/sys/fs/cgroup/*/{self.cgroup_root}/{task_id}/{name}") + \
            glob.glob(f"/sys/fs/cgroup/*/{self.cgroup_root}/*/{task_id}/{name}") + \
            glob.glob(f"/sys/fs/cgroup/*/*/*/{self.cgroup_root}/{task_id}/{name}")

    def assert_unharmed(self):
        """The victim runs, in its groups, and the server answers."""
        assert self.server.process.poll() is None, self.server.log()
        assert self.cli.status_row(self.victim, "client002")["STATUS"] == "JOB_STATUS_STARTED"
        assert self.output(self.victim, "client002") == f"{SECRET}\n".encode()
        if DRIVER != "none":
            with open(f"/proc/{self.victim_pid}/cgroup") as lines:
                groups = [line for line in lines if self.victim in line]
            assert len(groups) >= 2, groups


@pytest.fixture(scope="module")
def world():
    root = Path(task_visible_tempdir("attacks-"))
    instance = World(root)
    yield instance
    if instance.server.process.poll() is None:
        assert instance.server.stop() == 0, instance.server.log()
    shutil.rmtree(root, ignore_errors=True)


def test_a_task_runs_as_its_own_unprivileged_uid(world):
    code, first = world.attack("id -u; id -G; umask; grep -E 'NoNewPrivs|CapEff|CapBnd' /proc/self/status")
    assert code == 0, first
    uid = first.split()[0]
    assert uid != "0" and first.split()[1] == uid  # no supplementary groups
    assert "0077" in first and "NoNewPrivs:\t1" in first
    assert "CapEff:\t0000000000000000" in first and "CapBnd:\t0000000000000000" in first
    other = world.cli.start_id("client002", "id", "-u")
    world.cli.wait_ended(other, "client002")
    assert world.output(other, "client002").split()[0] not in (b"0", uid.encode())


def test_reading_another_users_output_fails(world):
    code, text = world.attack(f"cat {world.state}/output/*.log {world.state}/output/{world.victim}.log;"
                              f" ls {world.state}/output")
    assert code != 0 and "Permission denied" in text and SECRET not in text
    world.assert_unharmed()


def test_reading_the_server_keys_fails(world):
    keys = [world.state / "pki" / name for name in ("server.key", "ca.key", "client002.key")]
    code, text = world.attack(" ; ".join(f"cat {key}" for key in keys))
    assert code != 0 and "Permission denied" in text and "PRIVATE KEY" not in text
    world.assert_unharmed()


def test_signalling_tracing_or_reading_the_server_fails(world):
    server_pid = world.server.process.pid
    script = textwrap.dedent(f"""
        import ctypes, os, sys
        results = []
        try:
            os.kill({server_pid}, 0); results.append("signalled")
        except OSError as error:
            results.append("kill: " + error.strerror)
        try:
            os.kill(os.getppid(), 0); results.append("parent signalled")
        except OSError as error:
            results.append("kill ppid: " + error.strerror)
        for path in ("/proc/{server_pid}/mem", "/proc/{server_pid}/environ"):
            try:
                open(path, "rb").read(1); results.append("read " + path)
            except OSError as error:
                results.append(path + ": " + error.strerror)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, {server_pid}, None, None) == 0:  # PTRACE_ATTACH
            results.append("attached")
        else:
            results.append("ptrace: " + os.strerror(ctypes.get_errno()))
        print(results)
    """)
    code, text = world.attack(script, PYTHON)
    assert code == 0, text
    assert "signalled" not in text and "attached" not in text and "read /" not in text, text
    assert "kill: Operation not permitted" in text and "ptrace: " in text
    world.assert_unharmed()


@pytest.mark.skipif(DRIVER == "none", reason="no cgroups with the none driver")
def test_writing_another_tasks_cgroup_kill_or_limits_fails(world):
    targets = (world.group_files(world.victim, "cgroup.kill") + world.group_files(world.victim, "cgroup.procs")
               + world.group_files(world.victim, "freezer.state")
               + world.group_files(world.victim, "memory.limit_in_bytes"))
    assert any(path.endswith("cgroup.kill") for path in targets), targets
    before = {path: open(path).read() for path in targets if not path.endswith("cgroup.kill")}
    code, text = world.attack(" ; ".join(f"echo 1 > {path}" for path in targets)
                              + " ; cat /proc/self/cgroup > /dev/null")
    assert text.count("Permission denied") == len(targets), text
    assert before == {path: open(path).read() for path in before}
    world.assert_unharmed()


@pytest.mark.skipif(DRIVER == "none", reason="no cgroups with the none driver")
def test_leaving_the_groups_fails_and_limits_still_apply(world):
    code, text = world.attack(
        "for f in /sys/fs/cgroup/*/cgroup.procs /sys/fs/cgroup/*/*/cgroup.procs; do"
        " echo $$ > $f 2>/dev/null && echo MOVED $f; done;"
        " for f in /sys/fs/cgroup/*/" + world.cgroup_root + "/cgroup.procs; do"
        " echo $$ > $f 2>/dev/null && echo MOVED $f; done;"
        " memory=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup);"
        " cat /sys/fs/cgroup/memory$memory/memory.limit_in_bytes; cat /proc/self/cgroup")
    assert "MOVED" not in text, text
    assert str(512 << 20) in text, text  # the default --memory-max, still over this task
    own = [line for line in text.splitlines() if ":/" in line and world.cgroup_root in line]
    assert len(own) >= 2, text
    world.assert_unharmed()


def test_appending_to_another_users_log_fails(world):
    code, text = world.attack(f"echo injected >> {world.state}/output/{world.victim}.log;"
                              f" echo injected >> {world.state}/audit.log")
    assert code != 0 and text.count("Permission denied") == 2, text
    world.assert_unharmed()


def test_changing_the_store_fails(world):
    script = textwrap.dedent(f"""
        import sqlite3
        try:
            db = sqlite3.connect("{world.state}/tasks.db")
            db.execute("update tasks set owner='client001'")
            db.commit()
            print("CHANGED")
        except sqlite3.Error as error:
            print("refused:", error)
    """)
    code, text = world.attack(script, PYTHON)
    assert "CHANGED" not in text and "refused" in text, text
    world.assert_unharmed()


def test_signalling_or_inspecting_another_users_task_fails(world):
    pid = world.victim_pid
    code, text = world.attack(f"kill -9 {pid}; kill -STOP {pid}; cat /proc/{pid}/environ; cat /proc/{pid}/cmdline;"
                              f" ls /proc/{pid}/root/tmp; ps -e -o user= | sort -u")
    assert SECRET not in text and "victim-file" not in text, text
    assert "Operation not permitted" in text or "No such process" in text, text
    users = {line.strip() for line in text.splitlines() if line.strip().isdigit() or line.strip() == "root"}
    assert "root" not in users, text  # hidepid: no process of another user is listed
    world.assert_unharmed()


def test_writing_into_another_tasks_tmp_fails(world):
    planted = f"planted-{os.getpid()}"
    code, text = world.attack("; ".join(f"echo planted > {directory}/{planted}"
                                        for directory in WORLD_WRITABLE)
                              + f"; ls -A {' '.join(WORLD_WRITABLE)}; cat /tmp/victim-file")
    assert SECRET not in text and "victim-file" not in text.replace("/tmp/victim-file", ""), text
    # Written, but into the attacker's own tmpfs: nothing left on the host,
    # where it would outlive the task (pages in /dev/shm hold host memory).
    assert text.count(planted) == len(WORLD_WRITABLE), text
    assert not [directory for directory in WORLD_WRITABLE
                if os.path.exists(os.path.join(directory, planted))]
    world.assert_unharmed()


def test_setuid_binaries_cannot_regain_root(world):
    su = shutil.which("su")
    if su is None:
        pytest.skip("su is not installed")
    code, text = world.attack(f"{su} -c 'id -u > /dev/null; echo ROOT' root < /dev/null; id -u")
    assert "ROOT" not in text and text.split()[-1] != "0", text
    world.assert_unharmed()


def test_zz_stop_is_effective_output_is_exact_and_records_survive_a_restart(world):
    """Runs last: ends the victim, then crashes and restarts the server."""
    stopped = world.cli.run("stop", world.victim, user="client002")
    assert stopped.returncode == 0, stopped.stderr
    row = world.cli.wait_ended(world.victim, "client002")
    assert (row["STATUS"], row["EXIT CODE"]) == ("JOB_STATUS_EXITED_OK", "0")
    assert world.output(world.victim, "client002") == VICTIM_OUTPUT
    # A leftover with no environment, found after a crash by its start time.
    hidden = world.cli.start_id("client001", "sh", "-c", "exec env -i sleep 3000")
    hidden_pid = int(world.cli.status_row(hidden)["PID"])
    wait_for(lambda: open(f"/proc/{hidden_pid}/cmdline", "rb").read().startswith(b"sleep"),
             message="the task to exec sleep")
    listing = world.cli.run("list", "-o", "json", user="admin")
    assert listing.returncode == 0, listing.stderr
    world.server.kill()
    world.server.start()
    wait_for(lambda: not os.path.exists(f"/proc/{hidden_pid}"), timeout=20,
             message="the leftover sleep to be killed by recovery")
    row = world.cli.status_row(hidden)
    assert (row["STATUS"], row["SIGNAL"], row["SOURCE"]) == ("JOB_STATUS_SIGNALED", "SIGKILL", "server")
    # client002's record is still client002's, and only theirs.
    assert world.output(world.victim, "client002") == VICTIM_OUTPUT
    assert world.cli.run("get-status", world.victim, user="client001").returncode != 0
    after = world.cli.run("list", "-o", "json", user="admin")
    before_rows = {task["task_id"]: task for task in _tasks(listing.stdout)}
    after_rows = {task["task_id"]: task for task in _tasks(after.stdout)}
    assert before_rows[world.victim]["owner"] == "client002"
    for task_id, task in before_rows.items():
        if task_id != hidden:
            assert after_rows[task_id] == task, (task, after_rows[task_id])
    assert world.server.process.poll() is None
    world.server.process.send_signal(signal.SIGTERM)
    assert world.server.process.wait(60) == 0, world.server.log()


def _tasks(text: bytes) -> list:
    """``list -o json``: one JSON object a line."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
