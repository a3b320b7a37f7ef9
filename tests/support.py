"""Helpers for tests: bounded polling (every wait in a test ends), processes,
small file systems."""

import contextlib
import os
import subprocess
import time

import gevent
import pytest


def poll_for(predicate, timeout=10.0, message="condition", interval=0.01):
    """Return predicate()'s first truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        gevent.sleep(interval)


def process_running(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_of(task_id):
    """Live processes whose environment marks them as the task's (setsid or not)."""
    found = []
    marker = f"TASKMAN_TASK_ID={task_id}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if marker not in environ.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if process_running(int(name)):
            found.append(int(name))
    return found


@contextlib.contextmanager
def small_tmpfs(path, size):
    """Mount a tmpfs of ``size`` (e.g. "64k") at ``path`` for the block: a real
    disk that fills up. Skips the test without root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
