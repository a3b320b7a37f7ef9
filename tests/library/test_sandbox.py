"""The sandbox for real: tasks spawned through the compiled gate as an allocated
uid, and the host-wide uid registry (allocation, stability, concurrency)."""

import logging
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import gevent.os
import pytest

from support import poll_for, skip_needs_root
from taskman import sandbox, users
from taskman.errors import ConfigError, NotExecutable

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
SIGNALS = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})


@pytest.fixture
def registry(tmp_path):
    return users.Registry(str(tmp_path / "registry"))


@pytest.fixture
def confined(registry):
    if os.geteuid() != 0:
        skip_needs_root("the gate changes uid and mounts")
    sandbox.check_gate()
    uid = registry.uid_of("client001")
    return sandbox.Sandbox(uid=uid, gid=uid, tmp_size=4 << 20)


class Task:
    """A command started through the gate the way process.spawn starts it."""

    def __init__(self, policy, script, cwd="/"):
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        gate_read, gate_write = os.pipe2(os.O_CLOEXEC)
        argv = policy.gate_argv(cwd, "/bin/sh", ["-c", script])
        self.pid = os.posix_spawn(argv[0], argv, policy.environment(ENV), setsid=True,
                                  setsigdef=SIGNALS, setsigmask=(), file_actions=[
                                      (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                      (os.POSIX_SPAWN_DUP2, out_write, 1),
                                      (os.POSIX_SPAWN_DUP2, out_write, 2),
                                      (os.POSIX_SPAWN_DUP2, gate_read, 3)])
        os.close(out_write)
        os.close(gate_read)
        os.write(gate_write, b"\n")
        os.close(gate_write)
        self._output = out_read

    def finish(self):
        """Return (exit code, output) once the task has ended."""
        # Cooperative reads: gevent's os.close (which the test process is
        # patched with) completes on the hub, so a blocking read would wait
        # forever for the close of our own copy of the write end.
        os.set_blocking(self._output, False)
        chunks = []
        while chunk := gevent.os.nb_read(self._output, 65536):
            chunks.append(chunk)
        os.close(self._output)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def run(policy, script, cwd="/"):
    return Task(policy, script, cwd).finish()


def test_task_runs_as_its_uid_without_groups_capabilities_or_cores(confined):
    code, output = run(confined, "id -u; id -g; id -G; umask; ulimit -c; echo $HOME; cat /proc/self/status")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[:6] == [str(confined.uid), str(confined.gid), str(confined.gid), "0077", "0", "/tmp"]
    status = dict(line.split(":", 1) for line in lines[6:] if ":" in line)
    assert status["Groups"].strip() == ""
    assert status["NoNewPrivs"].strip() == "1"
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, field


# The host's world-writable directories, each a tmpfs of the task's own.
PRIVATE = [path for path in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(path)]


def test_private_tmp_is_fresh_per_task_and_gone_after(confined, tmp_path):
    marker = "/tmp/taskman-sandbox-test-marker"
    # A name nothing on the host has: the poll below must see the task's own file.
    name = f"taskman-sandbox-test-{os.getpid()}-{id(tmp_path)}"
    mine = f"/tmp/{name}"
    with open(marker, "w"):
        pass
    try:
        first = Task(confined, f"stat -f -c %T {' '.join(PRIVATE)}; ls -A {' '.join(PRIVATE)}; "
                               f"echo secret > {mine}; echo secret > /dev/shm/{name}; "
                               "exec sleep 30")
        poll_for(lambda: _has_file(first.pid, mine), message="the first task's file")
        mount_namespace = os.readlink(f"/proc/{first.pid}/ns/mnt")
        assert mount_namespace != os.readlink("/proc/self/ns/mnt")
        code, output = run(confined, f"ls -A /tmp /var/tmp; cat {mine}")
        assert code != 0 and "secret" not in output, output
        assert not os.path.exists(mine) and not os.path.exists(f"/dev/shm/{name}")
        os.killpg(first.pid, signal.SIGKILL)
        _, first_output = first.finish()
    finally:
        os.unlink(marker)
    assert first_output.splitlines()[:len(PRIVATE)] == ["tmpfs"] * len(PRIVATE), first_output
    assert "taskman-sandbox-test-marker" not in first_output
    # The namespace (and with it the tmpfs) ends with the task's last process.
    poll_for(lambda: not any(_namespace_of(pid) == mount_namespace for pid in os.listdir("/proc") if pid.isdigit()),
             message="the task's mount namespace to end")


def _has_file(pid, path):
    return os.path.exists(f"/proc/{pid}/root{path}")


def _namespace_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def test_proc_shows_only_the_tasks_own_user(confined):
    code, output = run(confined, f"cat /proc/1/cmdline; ls -d /proc/{os.getpid()}; ls -d /proc/$$ && echo own")
    assert "No such file" in output and output.rstrip().endswith("own"), output
    assert f"/proc/{os.getpid()}\n" not in output


def test_setuid_programs_cannot_regain_root(confined):
    candidates = [path for path in ("/usr/bin/su", "/bin/su", "/usr/bin/sudo") if os.path.exists(path)]
    if not candidates:
        pytest.skip("neither su nor sudo is installed")
    for program in candidates:
        arguments = "-n id -u" if program.endswith("sudo") else "-c 'id -u' root"
        code, output = run(confined, f"{program} {arguments} </dev/null")
        assert code != 0, output
        assert "\n0\n" not in f"\n{output}"


@pytest.fixture
def outside_tmp():
    # Not under /tmp or /var/tmp, which a task sees as its own empty tmpfs.
    path = tempfile.mkdtemp(prefix="taskman-test-", dir="/run")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def test_root_only_directory_is_closed(confined, outside_tmp):
    private = outside_tmp / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("token")
    code, output = run(confined, f"cat {private}/secret; ls {private}")
    assert code != 0 and "token" not in output and "Permission denied" in output, output
    with pytest.raises(NotExecutable):
        confined.check_executable(str(private / "secret"))
    confined.check_executable("/bin/true")


def test_gate_failures_exit_125_and_exec_failures_126_127(confined):
    assert run(confined, "true", cwd="/nonexistent")[0] == 125
    argv = confined.gate_argv("/", "/nonexistent/program", [])
    pid = os.posix_spawn(argv[0], argv, ENV, file_actions=[(os.POSIX_SPAWN_OPEN, 3, "/dev/zero", os.O_RDONLY, 0)])
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 127
    # The server closing the gate without a byte: the command never runs.
    argv = confined.gate_argv("/", "/bin/touch", ["/tmp/taskman-gate-must-not-run"])
    pid = os.posix_spawn(argv[0], argv, ENV, file_actions=[(os.POSIX_SPAWN_OPEN, 3, "/dev/null", os.O_RDONLY, 0)])
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 125
    assert not os.path.exists("/tmp/taskman-gate-must-not-run")


def test_unconfined_runs_as_root_as_before():
    if os.geteuid() != 0:
        skip_needs_root("runs a task as root")
    code, output = run(sandbox.UNCONFINED, "id -u; umask")
    assert (code, output.split()) == (0, ["0", "0022"])


def test_registry_gives_each_identity_its_own_stable_uid(tmp_path):
    path = str(tmp_path / "registry")
    first = users.Registry(path)
    uids = {identity: first.uid_of(identity) for identity in ("client001", "client002", "admin")}
    assert len(set(uids.values())) == 3
    assert all(uid in users.DEFAULT_IDS for uid in uids.values())
    again = users.Registry(path)
    assert {identity: again.uid_of(identity) for identity in reversed(list(uids))} == uids


def test_registry_skips_ids_of_existing_accounts(tmp_path):
    taken = pwd.getpwnam("nobody").pw_uid
    registry = users.Registry(str(tmp_path / "registry"), ids=range(taken, taken + 5))
    assert registry.uid_of("client001") != taken


def test_registry_refuses_a_uid_an_account_took_later(tmp_path):
    path = tmp_path / "registry"
    path.write_text(f"client001 {pwd.getpwnam('nobody').pw_uid}\n")
    with pytest.raises(ConfigError):
        users.Registry(str(path)).uid_of("client001")


def test_registry_full_range_and_corrupt_file(tmp_path):
    registry = users.Registry(str(tmp_path / "registry"), ids=range(90000, 90001))
    registry.uid_of("client001")
    with pytest.raises(users.ResourceExhausted):
        registry.uid_of("client002")
    (tmp_path / "bad").write_text("client001 seventy\n")
    with pytest.raises(ConfigError):
        users.Registry(str(tmp_path / "bad")).uid_of("client001")


def test_registry_two_processes_allocating_at_once(tmp_path):
    path = str(tmp_path / "registry")
    script = textwrap.dedent("""
        import sys
        from taskman.users import Registry
        for number in range(40):
            registry = Registry(sys.argv[1])  # a fresh object: no cache, every call reads the file
            print(f"client{number:03d}", registry.uid_of(f"client{number:03d}"), flush=True)
    """)
    processes = [subprocess.Popen([sys.executable, "-c", script, path], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [dict(line.split() for line in process.communicate(timeout=60)[0].splitlines())
               for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert results[0] == results[1] and len(results[0]) == 40
    assert len(set(results[0].values())) == 40
    with open(path) as registry:
        assert len(registry.read().splitlines()) == 40


def test_user_map(tmp_path, caplog):
    path = tmp_path / "users"
    path.write_text("# identity account\nadmin root\nclient003   nobody  # an existing account\n\n")
    with caplog.at_level(logging.WARNING, logger="taskman.users"):
        mapping = users.load_user_map(str(path))
    assert mapping["admin"].uid == 0 and not mapping["admin"].confined
    assert mapping["client003"].uid == pwd.getpwnam("nobody").pw_uid
    assert any("admin" in record.getMessage() and record.levelno == logging.WARNING for record in caplog.records)
    everyone = users.Users(users.Registry(str(tmp_path / "registry")), mapping)
    assert everyone.sandbox_for("admin").uid == 0
    assert everyone.sandbox_for("client001").uid in users.DEFAULT_IDS
    for bad in ("admin root\nadmin root\n", "client001 no-such-account-here\n", "Client root\n", "x\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            users.load_user_map(str(path))
