#!/usr/bin/env python3
"""Fair sharing (#16): a quiet user's GetTaskStatus while another user floods.

    python bench/fairness.py [--rounds 2] [--phase-seconds 8] [--server PATH]

Starts a real taskman-server (default quotas and limits, its own temp
--state-dir and --cgroup-root, a free loopback port; needs root). client002
starts one task of its own and calls GetTaskStatus on it in a loop. Rounds
alternate a quiet phase (nothing else on the server) and a flood phase, in
which a separate process (this script with --flood, so the flooder's threads
never share a GIL with the timed calls) floods as client001:

- tasks up to its running quota, refills refused at the quota;
- streams up to its stream quota, reading a fast writer;
- many concurrent StopTask calls on tasks that trap SIGTERM;
- starts with arguments past the argument quota (refused);
- a fork bomb, bounded by the task's pids.max;
- an output flood (its log capped by the output quota).

Quiet and flood phases interleave, so background load on a shared machine
hits both alike; the verdict is a ratio (target: p99 under flood <= 2x quiet
p99). Prints a markdown table. Everything started is stopped on exit.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import percentile  # noqa: E402

QUIET_USER = "client002"
FLOOD_USER = "client001"
PYTHON = "/usr/bin/python3"
# Bound the flood's disk use: the output flood is capped at this per user.
OUTPUT_QUOTA = "512M"
TRAP_TERM = "trap '' TERM; while :; do sleep 1; done"
FAST_WRITER = "import os\nline = b'y' * 4095 + b'\\n'\nwhile True: os.write(1, line * 16)"
FORK_BOMB = "f() { f | f & }; f; sleep 60"
STOP_THREADS = 16
HUGE_ARGUMENT = "x" * (300 * 1024)  # past the default 256 KiB argument quota


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="quiet+flood pairs")
    parser.add_argument("--phase-seconds", type=float, default=8.0,
                        help="seconds of timed calls in each phase")
    parser.add_argument("--pause", type=float, default=0.005,
                        help="seconds between the quiet user's calls")
    parser.add_argument("--server", default=None, help="taskman-server script to run")
    parser.add_argument("--flood", default=None, metavar="ADDRESS",
                        help=argparse.SUPPRESS)  # the flooding child process
    return parser.parse_args(argv)


# -- the server


class Server:
    """taskman-server with default quotas, its own state dir and cgroup root."""

    def __init__(self, workdir: str, script: str):
        self.port = common.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "taskman-server.log")
        self.command = [sys.executable, script, "--server-address", self.address,
                        "--state-dir", os.path.join(workdir, "state"),
                        "--cgroup-root", f"taskman-fairness-{os.getpid()}",
                        "--stop-grace", "2", "--quota-output-bytes", OUTPUT_QUOTA]
        self.proc = None

    def __enter__(self) -> "Server":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            common.wait_for_port(self.port, 90, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        common.stop_process(self.proc, grace=30)

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-2000:]


def _script(explicit) -> str:
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "taskman-server")
    return beside if os.path.exists(beside) else (shutil.which("taskman-server") or "")


# -- the flooding process


def flood(address: str) -> None:
    """Run every kind of flood as FLOOD_USER until stdin closes."""
    from taskman.client import ClientError, TaskmanClient

    client = TaskmanClient(address, FLOOD_USER, timeout=30)
    counts: Dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Event()

    def count(name: str) -> None:
        with lock:
            counts[name] = counts.get(name, 0) + 1

    def start(command: str, *args: str):
        try:
            return client.start(command, list(args))
        except ClientError as error:
            count(f"start refused ({error.code.name})")
            return None

    writer = start(PYTHON, "-c", FAST_WRITER)
    start(PYTHON, "-c", FAST_WRITER)  # the output flood: capped by the output quota
    start("/bin/sh", "-c", FORK_BOMB)
    trapping: List[str] = []
    for _ in range(STOP_THREADS * 2):
        task = start("/bin/sh", "-c", TRAP_TERM)
        if task:
            trapping.append(task)
    while start("/bin/sleep", "600"):  # the rest of the running quota
        count("quota filler")

    def stream() -> None:
        try:
            for _ in client.stream(writer):
                count("stream chunk")
                if done.is_set():
                    return
        except ClientError as error:
            count(f"stream ended ({error.code.name})")

    def stopper(index: int) -> None:
        while not done.is_set():
            task = trapping[index % len(trapping)]
            try:
                client.stop(task, wait=0)
                count("stop sent")
            except ClientError as error:
                count(f"stop refused ({error.code.name})")
            index += 1

    def refill() -> None:
        while not done.is_set():
            task = start("/bin/sh", "-c", TRAP_TERM)
            if task:
                trapping.append(task)
            else:
                time.sleep(0.05)

    def huge() -> None:
        while not done.is_set():
            start("/bin/echo", HUGE_ARGUMENT)

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(33)]
    threads += [threading.Thread(target=stopper, args=(i,), daemon=True)
                for i in range(STOP_THREADS)]
    threads += [threading.Thread(target=refill, daemon=True),
                threading.Thread(target=huge, daemon=True)]
    for thread in threads:
        thread.start()
    time.sleep(1)  # every kind under way before the timed calls begin
    print(json.dumps({"flooding": True}), flush=True)
    sys.stdin.read()  # until the harness closes it
    done.set()
    print(json.dumps({"counts": counts}), flush=True)
    os._exit(0)  # streams blocked in a read would hold the exit


# -- the harness


def timed_status(client, task_id: str, seconds: float, pause: float) -> List[float]:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        client.status(task_id)
        samples.append(time.perf_counter() - began)
        time.sleep(pause)
    return samples


def end_flood(admin, timeout: float = 60) -> None:
    """Stop every running task of FLOOD_USER and wait until none runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = admin.list(statuses=["JOB_STATUS_STARTED"], owner=FLOOD_USER)
        if not running:
            return
        for task in running:
            try:
                admin.stop(task.task_id, wait=0)
            except Exception:  # noqa: BLE001 - it may have ended meanwhile
                pass
        time.sleep(1)
    raise TimeoutError(f"{FLOOD_USER}'s tasks still running after {timeout}s")


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.flood:
        flood(args.flood)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root (cgroups, tasks as unprivileged uids)")
    common.certs_dir()  # the server and the flooder inherit $TASKMAN_CERTS_DIR
    from taskman.client import TaskmanClient

    workdir = tempfile.mkdtemp(prefix="taskman-bench-fairness-")
    script = _script(args.server)
    quiet: List[float] = []
    flooded: List[float] = []
    rounds = []
    loads = [loadavg()]
    began = time.monotonic()
    try:
        with Server(workdir, script) as server:
            with TaskmanClient(server.address, QUIET_USER) as client, \
                    TaskmanClient(server.address, "admin") as admin:
                own = client.start("/bin/sleep", "3600")
                timed_status(client, own, 1.0, args.pause)  # warm the channel
                for _ in range(args.rounds):
                    calm = timed_status(client, own, args.phase_seconds, args.pause)
                    flooder = subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "--flood", server.address],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                        start_new_session=True)
                    try:
                        ready = flooder.stdout.readline()
                        if "flooding" not in ready:
                            raise RuntimeError(f"flooder did not start: {ready!r}")
                        loads.append(loadavg())
                        busy = timed_status(client, own, args.phase_seconds, args.pause)
                        flooder.stdin.close()
                        counts = json.loads(flooder.stdout.readline() or "{}").get("counts", {})
                    finally:
                        common.stop_process(flooder, grace=5)
                    end_flood(admin)
                    quiet += calm
                    flooded += busy
                    rounds.append((calm, busy, counts))
                    print(f"round {len(rounds)}: quiet p99 {percentile(calm, 0.99) * 1000:.2f} ms, "
                          f"flood p99 {percentile(busy, 0.99) * 1000:.2f} ms; flood: {counts}",
                          file=sys.stderr, flush=True)
                client.stop(own, wait=0)
    except BaseException:
        print(server_log_tail(workdir), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    loads.append(loadavg())
    print(report(quiet, flooded, rounds, loads, time.monotonic() - began))
    return 0


def server_log_tail(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, "taskman-server.log"), errors="replace") as handle:
            return handle.read()[-2000:]
    except OSError:
        return ""


def report(quiet, flooded, rounds, loads, elapsed) -> str:
    def ms(values, fraction):
        return f"{percentile(values, fraction) * 1000:.2f} ms"

    ratio = common.ratio(percentile(flooded, 0.99), percentile(quiet, 0.99))
    lines = [
        f"GetTaskStatus of {QUIET_USER} on its own task, {len(rounds)} interleaved quiet/flood "
        f"rounds, {elapsed:.0f} s; load average (1/5/15 min) {' -> '.join(loads)}",
        "",
        "| phase | calls | p50 | p99 |",
        "|---|---|---|---|",
        f"| quiet (no flood) | {len(quiet)} | {ms(quiet, 0.5)} | {ms(quiet, 0.99)} |",
        f"| {FLOOD_USER} flooding | {len(flooded)} | {ms(flooded, 0.5)} | {ms(flooded, 0.99)} |",
        f"| **ratio flood/quiet** | | "
        f"{common.ratio(percentile(flooded, 0.5), percentile(quiet, 0.5)):.2f}x | "
        f"**{ratio:.2f}x** (target <= 2x: {'met' if ratio <= 2 else 'not met'}) |",
        "",
    ]
    for index, (calm, busy, counts) in enumerate(rounds, 1):
        lines.append(f"- round {index}: p99 {ms(calm, 0.99)} quiet, {ms(busy, 0.99)} flooding "
                     f"({common.ratio(percentile(busy, 0.99), percentile(calm, 0.99)):.2f}x); "
                     f"flood calls: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
