"""What the sandbox costs a start: the library's start with and without it, side by side.

    python bench/sandbox_start.py [COUNT] [STATE_DIR]

Runs two TaskManagers in this process (gevent-patched like the server, the
default cgroup driver under a cgroup root of its own each, so it never
touches a running server's groups): one with no ``users`` (tasks run as this
process's user through the gate, unconfined) and one with a uid registry of
its own (every task as an unprivileged uid in the full sandbox: private /tmp,
/var/tmp, IPC and /proc, no capabilities). Starts /bin/true COUNT times in
each, interleaved, and prints one JSON line: p50/p90/p99 in milliseconds of
``TaskManager.start`` (the call StartTask makes) and of start-to-exit (the
task has run), for both. Needs root (the sandbox changes uid).
"""

import os
import sys

import gevent.monkey  # noqa: I001 (gevent patches first, as in the server)

gevent.monkey.patch_all()

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent.event  # noqa: E402

from taskman import cgroups, users  # noqa: E402
from taskman.manager import TaskManager  # noqa: E402


def percentiles(samples):
    ordered = sorted(samples)
    return {name: round(ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000, 3)
            for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def manager(state_dir, name, task_users):
    try:
        driver = cgroups.select_driver("auto", cgroups.Limits(), root=f"taskman-bench-{name}-{os.getpid()}")
    except Exception:  # noqa: BLE001 - no cgroups here: time the gate alone
        driver = cgroups.select_driver("none")
    mgr = TaskManager(os.path.join(state_dir, name), driver=driver, users=task_users, retention_bytes=0)
    ended = {}
    mgr.listeners.append(lambda event, task: event == "ended" and ended[task.id].set())
    return mgr, ended, driver.name


def one_start(mgr, ended):
    began = time.perf_counter()
    task = mgr.start("client001", "/bin/true")
    started = time.perf_counter()
    event = ended.setdefault(task.id, gevent.event.Event())
    if not mgr.status("client001", task.id).running:
        event.set()
    event.wait(10)
    return started - began, time.perf_counter() - began


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    count = int(argv[0]) if argv else 300
    state_dir = argv[1] if len(argv) > 1 else tempfile.mkdtemp(prefix="taskman-bench-sandbox-")
    registry = users.Registry(os.path.join(state_dir, "registry"))
    plain, plain_ended, driver = manager(state_dir, "plain", None)
    boxed, boxed_ended, _ = manager(state_dir, "sandbox", users.Users(registry))
    timings = {"plain": ([], []), "sandbox": ([], [])}
    try:
        for _ in range(20):  # warm up both
            one_start(plain, plain_ended), one_start(boxed, boxed_ended)
        for _ in range(count):
            for name, (mgr, ended) in (("plain", (plain, plain_ended)), ("sandbox", (boxed, boxed_ended))):
                start, run = one_start(mgr, ended)
                timings[name][0].append(start)
                timings[name][1].append(run)
    finally:
        plain.shutdown(timeout=10)
        boxed.shutdown(timeout=10)
        if len(argv) < 2:
            shutil.rmtree(state_dir, ignore_errors=True)
    print(json.dumps({"count": count, "driver": driver, "loadavg": os.getloadavg()[0],
                      **{f"{name} start": percentiles(start) for name, (start, _) in timings.items()},
                      **{f"{name} start to exit": percentiles(run) for name, (_, run) in timings.items()}}))


if __name__ == "__main__":
    main()
