"""Reload in place (SIGHUP): the real server and CLI; the tests send SIGHUP themselves.

Each server runs from a program of its own (a small taskman-server script in
its directory), so a test can replace "the installed build" before the
reload: one that reports another version, one whose --check fails, one that
cannot start. Tasks run /usr/bin/python3 or sh as unprivileged uids.
"""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from server_harness import Cli, Server, started_servers, wait_for

from support import COUNTER, process_running

RELOAD_TIMEOUT = 30.0

SCRIPT = """#!{python}
import os
import sys
{before}
from taskman.cli.server import main

sys.exit(main())
"""
CHANGED_BUILD = 'os.environ["TASKMAN_VERSION_OVERRIDE"] = "99.0.0-reloaded"'
FAILING_CHECK = 'if "--check" in sys.argv:\n    print("FAIL simulated check"); sys.exit(1)'
FAILING_START = ('if "--check" not in sys.argv:\n'
                 '    import taskman.server as _server\n'
                 '    from taskman.errors import ConfigError\n'
                 '    def _fail(*args, **kwargs):\n'
                 '        raise ConfigError("simulated start-up failure of the new build")\n'
                 '    _server.serve = _fail')


class ReloadableServer(Server):
    """A Server started as ``<workdir>/taskman-server``, a script the test can replace."""

    def __init__(self, workdir: Path, *options: str, **kwargs):
        super().__init__(workdir, *options, **kwargs)
        self.program = self.workdir / "taskman-server"
        self.install()
        command = self.command[self.command.index("--server-address"):]
        if command.count("--stop-grace") > 1:  # the test's own, not the harness's
            first = command.index("--stop-grace")
            del command[first:first + 2]
        self.command = [str(self.program), *command]

    def install(self, before: str = "") -> None:
        """Put a build in place (``before``: code it runs before main)."""
        temporary = self.program.with_suffix(".new")
        temporary.write_text(SCRIPT.format(python=sys.executable, before=before))
        temporary.chmod(0o755)
        temporary.rename(self.program)

    def listenings(self) -> int:
        return len(re.findall(r"listening on 127\.0\.0\.1:\d+", self.log()))

    def reload(self, expect_listening: bool = True) -> float:
        """SIGHUP; wait (bounded) for the new image to listen; the seconds it took."""
        before = self.listenings()
        started = time.monotonic()
        self.process.send_signal(signal.SIGHUP)
        if expect_listening:
            wait_for(lambda: self.listenings() > before, RELOAD_TIMEOUT,
                     f"the reloaded server to listen:\n{self.log()}")
            assert self.process.poll() is None
        return time.monotonic() - started


@pytest.fixture
def start(tmp_path):
    yield from started_servers(tmp_path, ReloadableServer)


def counter(cli: Cli) -> str:
    return cli.start_id("client001", "/usr/bin/python3", "-c", COUNTER)


def assert_counter(output: bytes, at_least: int = 1) -> None:
    numbers = output.decode().split()
    assert len(numbers) >= at_least, output[-200:]
    expected = [str(number) for number in range(len(numbers))]
    if numbers != expected:
        for index, (got, want) in enumerate(zip(numbers, expected, strict=True)):
            assert got == want, f"at line {index}: {got!r} instead of {want!r} (gap or repeat)"


def nice_values(pid: int) -> set:
    """The nice values of every thread of process ``pid``."""
    values = set()
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{thread}/stat") as file:
                values.add(int(file.read().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:
            pass  # the thread ended meanwhile
    return values


def stream_count(server: ReloadableServer, cli: Cli, task_id: str) -> int:
    result = cli.run("stream", task_id, "--tail-bytes", "100", "--no-follow")
    if result.returncode:
        return 0
    return int(result.stdout.split()[-1])


def test_reload_keeps_the_task_and_the_follower_sees_every_byte_once(start):
    server = start()
    cli = Cli(server)
    task_id = counter(cli)
    before = cli.status_row(task_id)
    follower = cli.follow(task_id)
    first = follower.stdout.readline()  # connected: a follower that never was gives up at once
    nice = nice_values(server.process.pid)
    server.install(CHANGED_BUILD)  # "pip install -U" of a build that says so
    took = server.reload()
    assert "taskman-server 99.0.0-reloaded" in server.log()
    # The reload's priority boost is undone on every thread before it serves.
    assert nice_values(server.process.pid) == nice
    after = cli.status_row(task_id)
    assert after["PID"] == before["PID"] and after["STATUS"] == "JOB_STATUS_STARTED"
    assert process_running(int(before["PID"]))
    time.sleep(0.5)
    assert cli.run("stop", task_id).returncode == 0
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert b"the server is reloading" in err, err  # told so, not cancelled
    assert_counter(first + out, at_least=200)
    assert cli.status_row(task_id)["SOURCE"] == "user"
    # New work after the reload: start, status, output.
    fresh = cli.start_id("client001", "sh", "-c", "echo after reload")
    assert cli.wait_ended(fresh)["STATUS"] == "JOB_STATUS_EXITED_OK"
    assert cli.run("stream", fresh).stdout == b"after reload\n"
    assert "adopted 1 running task(s)" in server.log()
    print(f"SIGHUP to listening again: {took:.2f}s")


@pytest.mark.timeout(300)  # a follower may wait out a reload for up to 60 s (cli.follow)
def test_three_reloads_under_many_followers(start):
    followers_count = int(os.environ.get("TASKMAN_TEST_RELOAD_FOLLOWERS", "16"))
    server = start()
    cli = Cli(server)
    task_ids = [counter(cli) for _ in range(4)]
    followers = [(task_ids[index % len(task_ids)], cli.follow(task_ids[index % len(task_ids)]))
                 for index in range(followers_count)]
    pids = {task_id: cli.status_row(task_id)["PID"] for task_id in task_ids}
    firsts = [follower.stdout.readline() for _, follower in followers]
    for _ in range(3):
        time.sleep(0.7)
        server.reload()
    for task_id in task_ids:
        assert cli.status_row(task_id)["PID"] == pids[task_id]
        assert cli.run("stop", task_id).returncode == 0
    for (_, follower), first in zip(followers, firsts, strict=True):
        out, err = follower.communicate(timeout=120)
        assert follower.returncode == 0, err
        assert_counter(first + out, at_least=500)
    assert server.log().count("adopted 4 running task(s)") == 3


def test_reload_while_a_task_is_stopping_keeps_its_grace(start):
    server = start("--stop-grace", "9")
    cli = Cli(server)
    task_id = cli.start_id("client001", "sh", "-c", "trap '' TERM; while :; do sleep 0.1; done")
    time.sleep(0.3)
    stopped_at = time.monotonic()
    assert cli.run("stop", task_id, "--no-wait").returncode == 0
    time.sleep(1.0)
    server.reload()
    assert cli.status_row(task_id)["STATUS"] == "JOB_STATUS_STARTED"  # still in its grace
    row = cli.wait_ended(task_id, timeout=20)
    elapsed = time.monotonic() - stopped_at
    assert row["STATUS"] == "JOB_STATUS_SIGNALED" and row["SIGNAL"] == "SIGKILL"
    assert row["SOURCE"] == "user"
    assert 8.5 <= elapsed < 13, f"SIGKILL {elapsed:.1f}s after the stop, grace 9s"


def test_a_failing_check_leaves_the_server_as_it_was(start):
    server = start()
    cli = Cli(server)
    task_id = counter(cli)
    server.install(FAILING_CHECK)
    server.reload(expect_listening=False)
    wait_for(lambda: "reload refused" in server.log(), 30, "the refusal")
    assert "FAIL simulated check" in server.log()
    assert server.listenings() == 1 and server.process.poll() is None
    audit = (server.state_dir / "audit.log").read_text()
    assert '"server.reload_refused"' in audit
    assert cli.status_row(task_id)["STATUS"] == "JOB_STATUS_STARTED"
    assert cli.run("stop", task_id).returncode == 0


def test_a_new_image_that_cannot_start_ends_the_tasks_cleanly(start, tmp_path):
    server = start()
    cli = Cli(server)
    task_id = counter(cli)
    pid = int(cli.status_row(task_id)["PID"])
    server.install(FAILING_START)
    server.process.send_signal(signal.SIGHUP)
    assert server.process.wait(60) == 1
    log = server.log()
    assert "the new image could not start: ended the 1 task(s)" in log, log
    assert not process_running(pid)
    # The record says so: a server on the same state directory reads it.
    server.install()
    again = ReloadableServer(server.workdir, copy_pki=False)
    again.command = server.command
    again.start()
    try:
        row = Cli(again).status_row(task_id)
        assert row["STATUS"] == "JOB_STATUS_SIGNALED" and row["SOURCE"] == "server"
    finally:
        assert again.stop() == 0


def test_a_reloaded_image_serves_on_when_it_cannot_close_its_files(monkeypatch, tmp_path,
                                                                    caplog):
    """A reload's --check no longer walks the file modes, so the new image
    must not refuse to start (and end every task) over one it cannot fix."""
    from types import SimpleNamespace

    from taskman import private, server
    from taskman.errors import ConfigError

    def cannot(paths):
        raise PermissionError(1, "Operation not permitted", str(tmp_path / "stuck"))

    monkeypatch.setattr(private, "close_to_tasks", cannot)
    settings = SimpleNamespace(audit_path=lambda state_dir: os.path.join(state_dir, "audit.log"),
                               server_key=None, ca_key=None)
    with pytest.raises(ConfigError, match="cannot set up tasks: Operation not permitted"):
        server.close_to_tasks(settings, str(tmp_path))
    server.close_to_tasks(settings, str(tmp_path), reloaded=True)
    assert "serving on as the previous image did" in caplog.text
