"""Helpers for tests: bounded polling (every wait in a test ends), processes,
small file systems, and which skips mean "this host lacks root or cgroups"."""

import contextlib
import os
import subprocess
import time

import gevent
import pytest

# Skip reasons, as the suites word them, that mean the host lacks root or a
# working cgroup driver. Under TASKMAN_REQUIRE_CGROUPS=1 (which .ci/run sets)
# tests/conftest.py turns such a skip into a failure. A new skip of that kind
# must start with one of these, e.g. through skip_needs_root().
NEEDS_ROOT_OR_CGROUPS = ("needs root", "no cgroup driver", "no cgroup2 mount",
                         "cannot mount a tmpfs")


def needs_root_or_cgroups(reason):
    """True if a skip ``reason`` says the host lacks root or cgroups."""
    return reason.removeprefix("Skipped: ").startswith(NEEDS_ROOT_OR_CGROUPS)


def skip_needs_root(why):
    """Skip for want of root, in words that TASKMAN_REQUIRE_CGROUPS=1 fails."""
    pytest.skip(f"needs root: {why} (uid {os.geteuid()})")


def driver_for_tests(kind, suffix=""):
    """A cgroup driver for a test's TaskManager: ``none``, or the host's own
    (``cgroup``) under a root of this process's own, since another taskman
    server on this host (a developer's, a benchmark's) holds the default one
    locked. Skips, in TASKMAN_REQUIRE_CGROUPS's words, where there is none."""
    from taskman import cgroups

    if kind == "none":
        return cgroups.select_driver("none")
    if os.geteuid() != 0:
        skip_needs_root("cgroups are managed by root")
    try:
        return cgroups.select_driver("auto", cgroups.Limits(),
                                     root=f"taskman-test-{os.getpid()}{suffix}")
    except Exception as error:  # noqa: BLE001 - the reason is printed
        pytest.skip(f"no cgroup driver on this host: {error}")


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


def timed_direct_io(manager, directory, size_mib, timeout):
    """Time two tasks: dd reading a ``size_mib`` MiB file in ``directory``
    with O_DIRECT, and dd writing as much there with O_DIRECT (the page cache
    would hide any IO limit). The file is written first, by the test itself,
    so no limit applies to it. Return {"read": (task, ended, seconds),
    "write": ...}, seconds counted from the start of both to each one's end.
    """
    source = os.path.join(directory, "source.bin")
    with open(source, "wb") as file:
        file.write(os.urandom(1 << 20) * size_mib)
        os.fsync(file.fileno())
    started = time.monotonic()
    tasks = {"read": manager.start("alice", "dd", [f"if={source}", "of=/dev/null", "bs=1M",
                                                   "iflag=direct"]),
             "write": manager.start("alice", "dd", ["if=/dev/zero", f"of={directory}/sink.bin",
                                                    "bs=1M", f"count={size_mib}", "oflag=direct"])}
    results = {}
    for name, task in tasks.items():
        ended = poll_for(lambda task=task: (lambda t: None if t.running else t)(
            manager.status("alice", task.id)), timeout=timeout, message=f"dd {name} to end")
        results[name] = (task, ended, time.monotonic() - started)
    return results


@contextlib.contextmanager
def small_tmpfs(path, size):
    """Mount a tmpfs of ``size`` (e.g. "64k") at ``path`` for the block: a real
    disk that fills up. Skips the test without root."""
    if os.geteuid() != 0:
        skip_needs_root("to mount a tmpfs")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


# A Python task printing 0, 1, 2, ... a line a millisecond: its output shows
# any gap or repeat a follower saw (the reload tests of both suites).
COUNTER = ("import time\n"
           "i = 0\n"
           "while True:\n"
           "    print(i, flush=True)\n"
           "    i += 1\n"
           "    time.sleep(0.001)\n")


# Where files tasks must see live: tasks run as unprivileged uids with their
# own tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock, and the checkout may be
# unreadable to them. Mode 0755 all the way down.
TASK_VISIBLE_PARENT = "/var/lib/taskman-tests"


def task_visible_tempdir(prefix: str) -> str:
    """A new 0755 directory any task's uid can read, under TASK_VISIBLE_PARENT."""
    import tempfile

    os.makedirs(TASK_VISIBLE_PARENT, mode=0o755, exist_ok=True)
    os.chmod(TASK_VISIBLE_PARENT, 0o755)
    path = tempfile.mkdtemp(prefix=prefix, dir=TASK_VISIBLE_PARENT)
    os.chmod(path, 0o755)
    return path


def fixture(name: str) -> str:
    """The path of fixture program ``name`` (tests/fixtures/), copied where
    any task's uid can read it (``task_visible_tempdir``)."""
    global _fixture_copies
    if _fixture_copies is None:
        import atexit
        import shutil

        _fixture_copies = task_visible_tempdir("fixtures-")
        atexit.register(shutil.rmtree, _fixture_copies, True)
    path = os.path.join(_fixture_copies, name)
    if not os.path.exists(path):
        with open(os.path.join(FIXTURES, name), "rb") as source, open(path + ".new", "wb") as copy:
            copy.write(source.read())
        os.chmod(path + ".new", 0o755)
        os.replace(path + ".new", path)
    return path


_fixture_copies = None


class CallAborted(Exception):
    """What FakeCallContext.abort raises, as grpc's abort does."""


class FakeCallContext:
    """A servicer context of one call over mTLS presenting ``pem``: what the
    guard asks of it, and its reply's callbacks, run when the test calls
    ``end`` (grpc runs them once the call is over)."""

    def __init__(self, pem: bytes, tls_version: bytes = b"TLSv1.3", common_name: bytes = b""):
        self.auth = {"transport_security_type": [b"ssl"], "ssl_tls_version": [tls_version],
                     "x509_pem_cert": [pem]}
        if common_name:
            self.auth["x509_common_name"] = [common_name]
        self.callbacks = []
        self.aborted = None

    def auth_context(self):
        return self.auth

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def is_active(self):
        return True

    def code(self):
        return None

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def abort(self, code, details):
        self.aborted = (code, details)
        raise CallAborted()

    def end(self):
        for callback in self.callbacks:
            callback()
