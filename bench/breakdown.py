"""Where a start's time goes: the library's start path timed piece by piece.

    python bench/breakdown.py COUNT STATE_DIR [WARM]

Runs a TaskManager in this process (gevent-patched like the server, default
cgroup driver under a cgroup root of its own, so it never touches a running
server's groups; WARM ready groups per user, by default none, as the server
keeps), wraps the steps of ``TaskManager.start`` with timers (the pid's
placement into the groups is not one: the gate joins them itself, after
the start returns),
starts /bin/true COUNT times and prints one JSON line: the p50 of each step
and of the whole call, and of a bare posix_spawn+waitpid in the same process.
StartTask over gRPC minus ``manager.start`` is then the RPC's own cost.
"""

import os
import sys

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import gevent.monkey  # noqa: I001 (gevent patches first, as in the server)

gevent.monkey.patch_all()

import collections  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from taskman import manager as manager_module  # noqa: E402
from taskman import process, task_groups  # noqa: E402
from taskman.cgroups import select_driver  # noqa: E402
from taskman.manager import TaskManager  # noqa: E402

timings = collections.defaultdict(list)
# Kept before the timers wrap it: the bare spawns below are not timed as steps.
_original_posix_spawn = os.posix_spawn


def timed(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings[label].append(time.perf_counter() - began)

    setattr(owner, name, wrapper)


def main() -> None:
    count, state_dir = int(sys.argv[1]), sys.argv[2]
    warm = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    os.makedirs(state_dir, exist_ok=True)
    driver = select_driver("auto", root="taskman-bench-breakdown", io_paths=("/", state_dir))
    manager = TaskManager(state_dir=state_dir, driver=driver, stop_grace=1, warm_groups=warm)
    try:
        timed(manager_module, "create_log", "output file (OutputLog)")
        # The driver's create runs in the worker (ahead of the start with
        # ready groups; else while the start makes the output file): the
        # start itself waits only for the rest of it.
        timed(task_groups.Making, "get", "waiting for the task group (after the output file)")
        timed(manager.driver, "create", "cgroup create (mkdir + limits, in the worker)")
        timed(process, "spawn", "spawn (gate, place, release)")
        timed(process, "_posix_spawn", "posix_spawn of the gate")
        timed(manager.store, "save_started", "task record (SQLite)")
        for _ in range(20):
            manager.start("bench", "/bin/true")
            gevent.sleep(0.005)
        timings.clear()
        whole, bare = [], []
        for _ in range(count):
            began = time.perf_counter()
            manager.start("bench", "/bin/true")
            whole.append(time.perf_counter() - began)
            # Let the task's supervisor run (the server does this between
            # calls too), so its end-of-task work is not timed as the start.
            gevent.sleep(0.005)
            began = time.perf_counter()
            pid = _original_posix_spawn("/bin/true", ["/bin/true"], os.environ)
            os.waitpid(pid, 0)
            bare.append(time.perf_counter() - began)
        steps = {label: common.median(values) for label, values in timings.items()}
        print(json.dumps({"count": count, "manager_start": common.median(whole),
                          "manager_start_p99": common.percentile(whole, 0.99),
                          "bare_spawn_wait": common.median(bare), "steps": steps}), flush=True)
    finally:
        manager.shutdown(timeout=10)


if __name__ == "__main__":
    main()
