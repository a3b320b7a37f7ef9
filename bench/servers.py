"""The servers a bench run measures: taskman-server and the bare gRPC ceiling.

Each is a subprocess in its own session on a free loopback port, stopped on
exit; both use the run's PKI ($TASKMAN_CERTS_DIR, set by common.certs_dir).
"""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence

import common

# The identity whose tasks run outside the sandbox (mapped to root), for the
# StartTask row with the sandbox mapped off; every other identity is confined.
UNCONFINED_USER = "client002"


def find_script(name: str, explicit: Optional[str] = None) -> str:
    """``explicit``, else ``name`` beside this interpreter, else on PATH."""
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(beside):
        return beside
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install . into {sys.executable}'s environment")
    return found


class _Server:
    """A server subprocess whose output goes to ``log_path``."""

    proc: Optional[subprocess.Popen] = None
    log_path = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()


class TaskmanServer(_Server):
    """taskman-server on a free loopback port with a temp state dir."""

    def __init__(self, workdir: str, script: str, max_streams: int, cgroup_root: str = "taskman",
                 options: Sequence[str] = ()):
        self.script = script
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "taskman-server.log")
        self.user_map = os.path.join(workdir, "user-map")
        with open(self.user_map, "w") as handle:
            handle.write(f"{UNCONFINED_USER} root\n")
        self.port = common.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.command: List[str] = [
            sys.executable, script, "--server-address", self.address,
            "--state-dir", self.state_dir, "--max-streams", str(max_streams),
            "--stop-grace", "1", "--user-map", self.user_map,
            # Two servers at once (the idle followers' own) need two roots.
            "--cgroup-root", cgroup_root,
            # No per-task cap and no disk budget: the memory row's 10 GiB must
            # land on disk, and no finished task may be forgotten mid-run (the
            # bench deletes outputs itself).
            "--task-output-max", "0", "--output-budget", "0",
            # One user runs thousands of followers and tasks: per-user quotas
            # would refuse most of the bench.
            "--quota-open-streams", "0", "--quota-running-tasks", "0",
            "--quota-calls-in-flight", "0", "--quota-finished-records", "0",
            "--quota-output-bytes", "0", *options]
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "TaskmanServer":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            common.wait_for_port(self.port, 60, self.proc)
            deadline = time.monotonic() + 30
            while "listening on" not in self.log() and time.monotonic() < deadline:
                time.sleep(0.05)
        except BaseException as error:
            self.__exit__()
            raise RuntimeError(f"taskman-server did not start: {error}; its log ends:\n"
                               f"{self.log()[-2000:]}") from None
        return self

    def __exit__(self, *exc) -> None:
        common.stop_process(self.proc, grace=30)

    def driver_line(self) -> str:
        for line in self.log().splitlines():
            if "cgroup driver:" in line:
                return line.split("cgroup driver:", 1)[1].strip()
        return "unknown"

    def output_path(self, task_id: str) -> str:
        return os.path.join(self.state_dir, "output", task_id + ".log")

    def discard_output(self, task_id: str) -> None:
        """Delete a finished task's output file (the bench's disk budget)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.output_path(task_id))


class CeilingServer(_Server):
    """bench/ceiling.py: the same transport with nothing behind it."""

    def __init__(self, workdir: str, name: str = "ceiling", gate: bool = False):
        self.port = common.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, name + ".log")
        # --gate: its StartTask spawns /bin/true through the sandbox gate.
        self.options = ["--gate"] if gate else []
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "CeilingServer":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(common.BENCH_DIR, "ceiling.py"), str(self.port), *self.options],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            common.wait_for_port(self.port, 30, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        common.stop_process(self.proc, grace=5)
