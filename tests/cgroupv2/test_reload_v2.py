"""Reload in place (SIGHUP) on a pure cgroup v2 kernel: the installed
``taskman-server`` (started as in test_server_e2e, alone in a service group,
the v2 driver) execs itself; a task writing a counter keeps its pid, its
group and its limits, and a ``taskman stream`` follower attached across the
reload sees the counter with no gap and no repeat.

The v2 driver's start-up clean-up removes every group of an earlier run it
finds under its root: here it must spare the adopted task's group (and its
user's slice), and the server must find its own leaf again after the exec.
"""

import os
import re
import signal
import subprocess
import time

import guest
import pytest
from test_server_e2e import CLI, PYTHON, ROOT, USER, ended, get_status, server, start, taskman

from support import COUNTER, poll_for

guest.require_pure_v2(__name__)

pytestmark = pytest.mark.timeout(400)

__all__ = ["server"]  # the fixture, shared with test_server_e2e



def listenings(server) -> int:
    return len(re.findall(r"listening on 127\.0\.0\.1:\d+", server["log"]()))


def follow(server, task_id, offset=0) -> subprocess.Popen:
    env = {**os.environ, "TASKMAN_CERTS_DIR": server["certs"]}
    return subprocess.Popen([CLI, "stream", task_id, "--user-id", USER, "--server-address",
                             server["address"], "--offset", str(offset)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def finish(server, task_id, follower, output: bytes) -> bytes:
    """The rest of ``follower``'s output after ``output``. Under QEMU's
    emulation a reload takes tens of seconds, longer than the CLI's bounded
    retries (about 15 s): a follower that gave up is started again from the
    byte it reached, as its message tells a user to, so the check of every
    byte once still covers the reload."""
    out, err = follower.communicate(timeout=180)
    output += out
    if follower.returncode != 0 and b"cannot reach server" in err:
        print(f"the follower gave up during the reload; resuming at byte {len(output)}")
        return finish(server, task_id, follow(server, task_id, len(output)), output)
    assert follower.returncode == 0, err
    return output


def test_reload_keeps_the_task_its_group_and_every_byte(server):
    base = f"{server['service']}/{ROOT}"
    task_id = start(server, PYTHON, "-c", COUNTER)
    before = get_status(server, task_id)
    pid = int(before["PID"])
    group = guest.task_group(base, task_id)
    assert guest.relative_cgroup(pid) == group[len(guest.CG_ROOT):]
    follower = follow(server, task_id)
    first = follower.stdout.readline()  # connected
    assert first == b"0\n", first

    os.kill(server["pid"], signal.SIGHUP)
    started = time.monotonic()
    poll_for(lambda: listenings(server) > 1, timeout=240, interval=0.2,
             message="the reloaded server to listen")
    print(f"SIGHUP to listening again: {time.monotonic() - started:.1f}s")
    log = server["log"]()
    assert "adopted 1 running task(s)" in log, log

    # Same process, same group, same limits; the server is back in its leaf.
    after = get_status(server, task_id)
    assert (after["PID"], after["STATUS"]) == (before["PID"], "JOB_STATUS_STARTED"), after
    assert os.path.exists(f"/proc/{pid}")
    assert guest.relative_cgroup(pid) == group[len(guest.CG_ROOT):]
    assert guest.read(f"{group}/memory.max").strip() == str(64 << 20)
    assert guest.read(f"{group}/cpu.max").split() == ["200000", "1000000"]
    assert guest.relative_cgroup(server["pid"]) == f"{base[len(guest.CG_ROOT):]}/server"

    time.sleep(1.0)  # the counter runs on under the new image
    status, out, err = taskman(server, "stop", task_id)
    assert status == 0, err
    numbers = finish(server, task_id, follower, first).decode().split()
    assert len(numbers) >= 200, numbers[-5:]
    for index, number in enumerate(numbers):
        assert number == str(index), f"at line {index}: {number!r} (gap or repeat)"
    row = ended(server, task_id)
    assert (row["STATUS"], row["SOURCE"]) == ("JOB_STATUS_SIGNALED", "user"), row
    poll_for(lambda: not os.path.exists(group), timeout=30, message="the task group to go")

    # New work after the reload, in a group of its own.
    fresh = start(server, "sh", "-c", "echo after reload")
    assert ended(server, fresh)["STATUS"] == "JOB_STATUS_EXITED_OK"
    status, out, err = taskman(server, "stream", fresh)
    assert (status, out) == (0, "after reload\n"), err
