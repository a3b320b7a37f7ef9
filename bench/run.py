#!/usr/bin/env python3
"""taskman benchmarks, side by side with what users would run instead.

    python bench/run.py [--quick] [--output docs/benchmarks.md] [options]

Starts a real taskman-server (default cgroup driver and limits, temp
--state-dir, a free loopback port, output cap and disk budget off), a bare gRPC server with the same certificates (the
transport ceiling, bench/ceiling.py) and a private supervisord, measures
everything in one run on this machine and writes the report (ratios first:
absolute times on a shared machine are noise). Everything it starts is
stopped on exit and its temp directory (task output included) removed.
Needs root for the cgroup driver, and `pip install . -r bench/requirements.txt`
into the interpreter that runs it.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peer  # noqa: E402
import profiling  # noqa: E402
from common import GiB, MiB, fmt_mib, fmt_ms, fmt_rate, median, percentile, ratio  # noqa: E402

USER = "client001"
TRUE = "/bin/true"
DEFAULT_OUTPUT = os.path.join(common.REPO_DIR, "docs", "benchmarks.md")
FINDINGS = os.path.join(common.BENCH_DIR, "findings.md")

FULL = dict(start_samples=1000, status_samples=2000, sustain_seconds=10.0,
            stream_bytes=GiB, repeats=3, fanout=[1, 10, 100, 1000],
            fanout_budget=4 * GiB, fanout_max=256 * MiB, memory_bytes=10 * GiB,
            tail_window=20.0, profile_seconds=8.0)
QUICK = dict(start_samples=200, status_samples=300, sustain_seconds=3.0,
             stream_bytes=128 * MiB, repeats=1, fanout=[1, 10, 100, 1000],
             fanout_budget=256 * MiB, fanout_max=32 * MiB, memory_bytes=512 * MiB,
             tail_window=5.0, profile_seconds=3.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a smoke run of about a minute")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report path (markdown)")
    parser.add_argument("--json", default=None,
                        help="also write the raw results here (for before/after comparisons)")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="measure nothing: rewrite the report from a --json file")
    parser.add_argument("--tmpdir", default=None,
                        help="where the temp state dir goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--server", default=None, help="taskman-server script to run")
    parser.add_argument("--only", default="",
                        help="comma-separated sections: start,status,stream,fanout,memory,"
                             "peer,profile (default: all)")
    for name, value in FULL.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, type=lambda text: [int(x) for x in text.split(",")])
        elif isinstance(value, float):
            parser.add_argument(flag, type=float)
        else:
            parser.add_argument(flag, type=_size)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _size(text: str) -> int:
    """'1G', '512M', '64K' or a plain number of bytes."""
    units = {"K": 1024, "M": MiB, "G": GiB}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- the servers


def _script(name: str, explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(beside):
        return beside
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install . into {sys.executable}'s environment")
    return found


class TaskmanServer:
    """taskman-server on a free loopback port with a temp state dir."""

    def __init__(self, workdir: str, script: str, max_streams: int):
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "taskman-server.log")
        self.port = common.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.command = [sys.executable, script, "--server-address", self.address,
                        "--state-dir", self.state_dir, "--max-streams", str(max_streams),
                        "--stop-grace", "1",
                        # No per-task cap and no disk budget: the memory row's
                        # 10 GiB must land on disk, and no finished task may be
                        # forgotten mid-run (the bench deletes outputs itself).
                        "--task-output-max", "0", "--output-budget", "0",
                        # One user runs 1,000 followers and thousands of tasks:
                        # per-user quotas would refuse most of the bench.
                        "--quota-open-streams", "0", "--quota-running-tasks", "0",
                        "--quota-calls-in-flight", "0", "--quota-finished-records", "0",
                        "--quota-output-bytes", "0"]
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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

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


class CeilingServer:
    def __init__(self, workdir: str):
        self.port = common.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "ceiling.log")
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "CeilingServer":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(common.BENCH_DIR, "ceiling.py"), str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            common.wait_for_port(self.port, 30, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        common.stop_process(self.proc, grace=5)


# -- the bench


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str):
        self.args = args
        self.workdir = workdir
        self.results: Dict[str, dict] = {}
        self.notes: List[str] = []
        self.server: Optional[TaskmanServer] = None
        self.ceiling: Optional[CeilingServer] = None
        self.client = None
        self.workers: List[common.Worker] = []

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def worker(self, *args: str) -> common.Worker:
        worker = common.Worker(list(args))
        self.workers.append(worker)
        return worker

    def close_workers(self) -> None:
        while self.workers:
            self.workers.pop().close()

    def wait_ended(self, task_id: str, timeout: float, poll: float = 0.05,
                   latencies: Optional[List[float]] = None):
        """Poll GetTaskStatus until the task ended; optionally record each call's latency."""
        deadline = time.monotonic() + timeout
        while True:
            began = time.perf_counter()
            status = self.client.status(task_id)
            if latencies is not None:
                latencies.append(time.perf_counter() - began)
            if not status.running:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still running after {timeout}s")
            time.sleep(poll)

    # 1. start latency

    def bench_start(self) -> None:
        samples = self.args.start_samples
        rounds = 5
        per_round = max(1, samples // rounds)
        taskman, spawn_only, spawn_wait, subproc = [], [], [], []
        for _ in range(20):  # warm both paths
            self.client.start(TRUE)
            _bare_spawn()
        # Interleaved rounds: a burst of background load hits both sides alike.
        for _ in range(rounds):
            for _ in range(per_round):
                began = time.perf_counter()
                self.client.start(TRUE)
                taskman.append(time.perf_counter() - began)
            for _ in range(per_round):
                spawned, reaped = _bare_spawn()
                spawn_only.append(spawned)
                spawn_wait.append(reaped)
            for _ in range(per_round // 4 or 1):
                began = time.perf_counter()
                subprocess.run([TRUE], check=True)
                subproc.append(time.perf_counter() - began)
        # Paced: 10 ms between calls, so the previous task's end (reaping,
        # removing its groups) does not run on the loop during the next start.
        paced = []
        for _ in range(max(50, samples // 5)):
            time.sleep(0.01)
            began = time.perf_counter()
            self.client.start(TRUE)
            paced.append(time.perf_counter() - began)
        self.results["start"] = {
            "taskman": _stats(taskman), "paced": _stats(paced), "spawn_only": _stats(spawn_only),
            "spawn_wait": _stats(spawn_wait), "subprocess": _stats(subproc)}
        try:
            self.results["start"]["breakdown"] = self._breakdown(max(100, samples // 3))
        except Exception as error:  # the rows above stand without it
            self.notes.append(f"Start breakdown failed: {type(error).__name__}: {error}")
        self.log(f"start: taskman p50 {fmt_ms(median(taskman))}, bare posix_spawn+wait p50 "
                 f"{fmt_ms(median(spawn_wait))}")
        self.bench_sustained()

    def _breakdown(self, count: int) -> dict:
        """bench/breakdown.py: the library's start path timed step by step, in-process."""
        state = os.path.join(self.workdir, "breakdown")
        proc = subprocess.run([sys.executable, os.path.join(common.BENCH_DIR, "breakdown.py"),
                               str(count), state], capture_output=True, text=True, timeout=300)
        shutil.rmtree(state, ignore_errors=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"breakdown.py exited {proc.returncode}: {proc.stderr[-300:]}")
        return json.loads(lines[-1])

    def bench_sustained(self) -> None:
        seconds = self.args.sustain_seconds
        workers = [self.worker("starts", self.server.address, str(seconds)) for _ in range(4)]
        for worker in workers:
            worker.receive(120)
        cpu_before = common.cpu_seconds(self.server.pid)
        began = time.perf_counter()
        for worker in workers:
            worker.send({"go": True})
        replies = [worker.receive(seconds + 120) for worker in workers]
        elapsed = time.perf_counter() - began
        cpu = common.cpu_seconds(self.server.pid) - cpu_before
        self.close_workers()
        count = sum(reply["count"] for reply in replies)
        latencies = [value for reply in replies for value in reply["latencies"]]
        self.results["sustained"] = {
            "clients": 4, "seconds": elapsed, "count": count, "per_second": count / elapsed,
            "latency": _stats(latencies), "server_cpu_per_start": cpu / max(count, 1)}
        self.log(f"sustained: {count / elapsed:.0f} starts/s from 4 clients")

    # 2. status latency

    def bench_status(self) -> None:
        task_id = self.client.start(TRUE)
        self.wait_ended(task_id, 30)
        for _ in range(50):
            self.client.status(task_id)
        latencies = []
        for _ in range(self.args.status_samples):
            began = time.perf_counter()
            self.client.status(task_id)
            latencies.append(time.perf_counter() - began)
        self.results["status"] = {"taskman": _stats(latencies)}
        self.log(f"status: p50 {fmt_ms(median(latencies))}")

    # 3. one follower: taskman vs a plain pipe vs the transport ceiling

    def bench_stream(self) -> None:
        size = self.args.stream_bytes
        command = ["head", "-c", str(size), "/dev/zero"]
        taskman_follower = self.worker("follow", self.server.address, "1")
        ceiling_follower = self.worker("follow", self.ceiling.address, "1")
        taskman_follower.receive(60)
        ceiling_follower.receive(60)
        runs: Dict[str, List[dict]] = {"pipe": [], "ceiling": [], "live": [], "replay": []}
        for repeat in range(self.args.repeats):
            runs["pipe"].append(_pipe_read(command))
            cpu_before = common.cpu_seconds(self.ceiling.proc.pid)
            ceiling = _follow(ceiling_follower, str(size), size)
            ceiling["server_cpu"] = common.cpu_seconds(self.ceiling.proc.pid) - cpu_before
            runs["ceiling"].append(ceiling)
            with common.RssSampler(self.server.pid) as rss:
                cpu_before = common.cpu_seconds(self.server.pid)
                task_id = self.client.start(command[0], command[1:])
                live = _follow(taskman_follower, task_id, size)
                status = self.wait_ended(task_id, 60)
                live["task_seconds"] = (status.end_time - status.start_time).total_seconds()
                live["server_cpu"] = common.cpu_seconds(self.server.pid) - cpu_before
                cpu_before = common.cpu_seconds(self.server.pid)
                replay = _follow(taskman_follower, task_id, size)
                replay["server_cpu"] = common.cpu_seconds(self.server.pid) - cpu_before
            live["rss_peak"] = replay["rss_peak"] = rss.peak
            runs["live"].append(live)
            runs["replay"].append(replay)
            self.server.discard_output(task_id)
            self.log(f"stream {repeat + 1}/{self.args.repeats}: pipe "
                     f"{fmt_rate(runs['pipe'][-1]['rate'])}, ceiling "
                     f"{fmt_rate(runs['ceiling'][-1]['rate'])}, live "
                     f"{fmt_rate(live['rate'])}, replay {fmt_rate(replay['rate'])}")
        self.close_workers()
        self.results["stream"] = {
            "bytes": size, "repeats": self.args.repeats,
            **{name: {"rate": median([run["rate"] for run in values]),
                      "rates": [run["rate"] for run in values],
                      "ttfb": median([run["ttfb"] for run in values]),
                      "extra": values[len(values) // 2]}
               for name, values in runs.items()}}

    # 4. fan-out

    def bench_fanout(self) -> None:
        largest = min(self.args.fanout_max, self.args.fanout_budget)
        data_path = os.path.join(self.workdir, "fanout.data")
        _write_random(data_path, largest)
        rows = []
        for count in self.args.fanout:
            size = max(MiB // 4, min(self.args.fanout_max, self.args.fanout_budget // count))
            size = min(size, largest)
            rows.append(self._fanout_once(count, size, data_path))
        os.unlink(data_path)
        self.results["fanout"] = {"rows": rows}

    def _fanout_once(self, count: int, size: int, data_path: str) -> dict:
        expected = _sha256_prefix(data_path, size)
        processes = min(4, max(1, (count + 249) // 250))
        shares = [count // processes + (1 if index < count % processes else 0)
                  for index in range(processes)]
        rss_idle = common.rss_bytes(self.server.pid)
        began_connect = time.perf_counter()
        workers = [self.worker("follow", self.server.address, str(share), "--hash")
                   for share in shares]
        connected = [worker.receive(300) for worker in workers]
        connect_seconds = time.perf_counter() - began_connect
        rss_connected = common.rss_bytes(self.server.pid)
        with common.RssSampler(self.server.pid, interval=0.05) as rss:
            began_wall = time.time()
            task_id = self.client.start("head", ["-c", str(size), data_path])
            for worker in workers:
                worker.send({"task_id": task_id})
            replies = [worker.receive(900) for worker in workers]
        self.close_workers()
        followers = [follower for reply in replies for follower in reply["followers"]]
        errors = sum(reply["error_count"] for reply in replies)
        error_samples = [error for reply in replies for error in reply["errors"]]
        exact = sum(1 for follower in followers
                    if follower["bytes"] == size and follower["sha256"] == expected)
        finished = max(reply["go_wall"] + max(f["ended"] for f in reply["followers"])
                       for reply in replies if reply["followers"])
        elapsed = finished - began_wall
        ttfbs = [follower["ttfb"] for follower in followers if follower["ttfb"] is not None]
        status = self.wait_ended(task_id, 60)
        self.server.discard_output(task_id)
        row = {"followers": count, "bytes_each": size,
               "task_seconds": (status.end_time - status.start_time).total_seconds(), "exact": exact, "errors": errors,
               "error_samples": error_samples[:3], "seconds": elapsed,
               "aggregate": count * size / elapsed, "ttfb_p50": median(ttfbs),
               "ttfb_p99": percentile(ttfbs, 0.99), "ttfb_max": max(ttfbs, default=float("nan")),
               "connect_seconds": connect_seconds, "client_processes": processes,
               "rss_idle": rss_idle, "rss_connected": rss_connected, "rss_peak": rss.peak,
               "handshake_seconds": max(reply["connect_seconds"] for reply in connected)}
        self.log(f"fanout {count}: {exact}/{count} exact, {fmt_rate(row['aggregate'])} "
                 f"aggregate, ttfb p99 {fmt_ms(row['ttfb_p99'])}, rss peak {fmt_mib(rss.peak)}")
        return row

    # 5. memory while a task writes a lot

    def bench_memory(self) -> None:
        size = self.args.memory_bytes
        free = shutil.disk_usage(self.workdir).free
        margin = 4 * GiB
        if free < size + margin:
            scaled = max(256 * MiB, (free - margin) // GiB * GiB)
            self.notes.append(f"Memory row scaled down from {fmt_mib(size)} to "
                              f"{fmt_mib(scaled)}: {fmt_mib(free)} free on the state "
                              "directory's file system.")
            size = scaled
        command = ["head", "-c", str(size), "/dev/zero"]
        rows = {}
        for mode in ("no reader", "stalled reader"):
            staller = None
            if mode == "stalled reader":
                staller = self.worker("stall", self.server.address)
            status_latencies: List[float] = []
            timeout = size / (20 * MiB) + 120
            with common.RssSampler(self.server.pid, interval=0.25) as rss:
                began = time.perf_counter()
                task_id = self.client.start(command[0], command[1:])
                if staller is not None:
                    staller.send({"task_id": task_id})
                    staller.receive(60)
                # Status calls while the server writes: does disk writing
                # stall the event loop (and so every other client)?
                status = self.wait_ended(task_id, timeout, poll=0.05, latencies=status_latencies)
                elapsed = time.perf_counter() - began
            kept = os.path.getsize(self.server.output_path(task_id))
            self.server.discard_output(task_id)
            self.close_workers()
            rows[mode] = {"bytes": size, "kept": kept, "seconds": elapsed,
                          "task_seconds": (status.end_time - status.start_time).total_seconds(),
                          "rss_start": rss.first, "rss_peak": rss.peak,
                          "rss_min": min(rss.samples), "rss_end": rss.samples[-1],
                          "status": _stats(status_latencies)}
            self.log(f"memory, {mode}: {fmt_mib(size)} in {elapsed:.1f}s, rss "
                     f"{fmt_mib(rss.first)} -> peak {fmt_mib(rss.peak)}")
        self.results["memory"] = rows

    # 6. supervisord

    def bench_peer(self) -> None:
        size = self.args.stream_bytes
        directory = os.path.join(self.workdir, "supervisord")
        os.makedirs(directory)
        writer = f"head -c {size} /dev/zero"
        result: Dict[str, object] = {"bytes": size, "window": self.args.tail_window}
        samples = max(50, self.args.start_samples // 5)
        with peer.Supervisord(directory, writer) as supervisord:
            result["version"] = supervisord.rpc.supervisor.getSupervisorVersion()
            latencies, abnormal = supervisord.api_start_latencies(samples)
            result["api_start"] = _stats(latencies)
            result["api_start_abnormal"] = abnormal
            latencies = []
            for _ in range(samples):
                began = time.perf_counter()
                supervisord.rpc.supervisor.getProcessInfo("true")
                latencies.append(time.perf_counter() - began)
            result["api_status"] = _stats(latencies)
            result["ctl_start"] = _stats(supervisord.ctl_start_latencies(10))
            result["writer_alone"] = supervisord.writer_alone(size, timeout=120)
            with common.RssSampler(supervisord.pid) as rss:
                result["tail"] = supervisord.tail_follow(size, self.args.tail_window)
            result["supervisord_rss"] = (rss.first, rss.peak)
        taskman_cli = os.path.join(os.path.dirname(_script("taskman-server", self.args.server)),
                                   "taskman")
        if os.path.exists(taskman_cli):
            starts, floor = self._cli_start_latencies(taskman_cli, 10)
            result["taskman_ctl_start"], result["cli_floor"] = _stats(starts), _stats(floor)
            result["taskman_cli_stream"] = self._cli_stream(taskman_cli, size)
        else:
            self.notes.append("taskman CLI not found beside taskman-server: CLI rows skipped.")
        self.results["peer"] = result
        self.log(f"peer: supervisord startProcess p50 {fmt_ms(result['api_start']['p50'])}, "
                 f"tail -f {fmt_rate(result['tail']['bytes'] / result['tail']['seconds'])}")

    def _cli_base(self, cli: str) -> List[str]:
        return [sys.executable, cli]

    def _cli_start_latencies(self, cli: str, count: int) -> Tuple[List[float], List[float]]:
        """`taskman start` as a user types it, and interleaved with it the
        floor any gRPC CLI pays: an interpreter that imports grpc."""
        latencies, floor = [], []
        for _ in range(count):
            began = time.perf_counter()
            subprocess.run(self._cli_base(cli) + ["start", "--user-id", USER,
                                                  "--server-address", self.server.address,
                                                  "--", TRUE],
                           check=True, capture_output=True, timeout=60)
            latencies.append(time.perf_counter() - began)
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import grpc"], check=True, timeout=60)
            floor.append(time.perf_counter() - began)
        return latencies, floor

    def _cli_stream(self, cli: str, size: int) -> dict:
        """`taskman stream` of a live 'head -c SIZE /dev/zero' task, read from its stdout."""
        task_id = self.client.start("head", ["-c", str(size), "/dev/zero"])
        began = time.perf_counter()
        proc = subprocess.Popen(self._cli_base(cli) + ["stream", task_id, "--user-id", USER,
                                                       "--server-address", self.server.address],
                                stdout=subprocess.PIPE, start_new_session=True)
        received, first = 0, None
        try:
            while True:
                data = proc.stdout.read1(1 << 20)
                if not data:
                    break
                if first is None:
                    first = time.perf_counter() - began
                received += len(data)
            proc.wait(60)
        finally:
            common.stop_process(proc, grace=2)
        elapsed = time.perf_counter() - began
        self.wait_ended(task_id, 60)
        self.server.discard_output(task_id)
        return {"bytes": received, "seconds": elapsed, "ttfb": first,
                "rate": received / elapsed, "exit": proc.returncode}

    # 7. profiles

    def bench_profile(self) -> None:
        if not profiling.py_spy():
            self.notes.append("py-spy not installed: no profiles.")
            return
        seconds = self.args.profile_seconds
        result = {}
        # StartTask: one client in a loop.
        raw = os.path.join(self.workdir, "profile-start.txt")
        recorder = profiling.record(self.server.pid, seconds, raw)
        time.sleep(0.5)  # py-spy attaches
        cpu_before = common.cpu_seconds(self.server.pid)
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            self.client.start(TRUE)
            count += 1
        cpu = common.cpu_seconds(self.server.pid) - cpu_before
        profiling.finish(recorder, seconds + 60)
        result["start"] = {**profiling.summarize(raw, self.server.pid), "calls": count,
                           "cpu_per_call": cpu / max(count, 1)}
        # The stream path: followers replaying the finished stream task in a loop.
        size = self.args.stream_bytes
        task_id = self.client.start("head", ["-c", str(size), "/dev/zero"])
        self.wait_ended(task_id, 120)
        follower = self.worker("follow", self.server.address, "1")
        follower.receive(60)
        raw = os.path.join(self.workdir, "profile-stream.txt")
        recorder = profiling.record(self.server.pid, seconds, raw)
        time.sleep(0.5)
        streamed, cpu_before, began = 0, common.cpu_seconds(self.server.pid), time.perf_counter()
        while time.perf_counter() - began < seconds:
            streamed += _follow(follower, task_id, size)["bytes"]
        cpu = common.cpu_seconds(self.server.pid) - cpu_before
        profiling.finish(recorder, seconds + 60)
        self.close_workers()
        self.server.discard_output(task_id)
        result["stream"] = {**profiling.summarize(raw, self.server.pid), "bytes": streamed,
                            "cpu_per_gib": cpu / max(streamed, 1) * GiB}
        self.results["profile"] = result
        self.log("profiles recorded")


# -- measurement helpers


def _bare_spawn():
    """posix_spawn /bin/true: (seconds until it returned, seconds until reaped)."""
    began = time.perf_counter()
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    spawned = time.perf_counter()
    os.waitpid(pid, 0)
    return spawned - began, time.perf_counter() - began


def _pipe_read(command: List[str]) -> dict:
    """The same writer into a plain pipe, read by this process in 256 KiB reads."""
    read_end, write_end = os.pipe()
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=write_end)
    os.close(write_end)
    received, first = 0, None
    try:
        while True:
            data = os.read(read_end, 1 << 18)
            if not data:
                break
            if first is None:
                first = time.perf_counter() - began
            received += len(data)
    finally:
        os.close(read_end)
        proc.wait(60)
    elapsed = time.perf_counter() - began
    return {"bytes": received, "seconds": elapsed, "rate": received / elapsed, "ttfb": first}


def _follow(worker: common.Worker, task_id: str, size: int) -> dict:
    worker.send({"task_id": task_id})
    reply = worker.receive(900)
    if reply["error_count"]:
        raise RuntimeError(f"follower failed: {reply['errors']}")
    follower = reply["followers"][0]
    if follower["bytes"] != size:
        raise RuntimeError(f"follower got {follower['bytes']} bytes, expected {size}")
    seconds = follower["ended"] - follower["opened"]
    return {"bytes": follower["bytes"], "seconds": seconds, "rate": follower["bytes"] / seconds,
            "ttfb": follower["ttfb"]}


def _stats(values: List[float]) -> dict:
    return {"n": len(values), "p50": median(values), "p99": percentile(values, 0.99),
            "max": max(values, default=float("nan"))}


def _write_random(path: str, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as handle:
        written = 0
        counter = 0
        while written < size:
            # A counter in every block: a duplicated or skipped chunk changes the hash.
            chunk = counter.to_bytes(8, "little") + block[8:]
            chunk = chunk[:size - written]
            handle.write(chunk)
            written += len(chunk)
            counter += 1


def _sha256_prefix(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = size
        while remaining:
            data = handle.read(min(remaining, 4 * MiB))
            if not data:
                break
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


# -- the machine and the report


def machine(workdir: str, server: Optional[TaskmanServer]) -> Dict[str, str]:
    info = {}
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["cpus"] = f"{os.cpu_count()} ({_cpu_model()})"
    info["memory"] = f"{_meminfo('MemTotal') / GiB:.1f} GiB"
    info["kernel"] = platform.release()
    info["cgroups"] = _cgroup_layout()
    if server is not None:
        info["driver"] = server.driver_line()
        info["server"] = "taskman-server " + " ".join(server.command[2:]).replace(
            workdir, "$TMP") + " (all else default)"
    usage = shutil.disk_usage(workdir)
    info["disk"] = f"{usage.free / GiB:.0f} GiB free of {usage.total / GiB:.0f} GiB at {workdir}"
    info["python"] = platform.python_version()
    info["versions"] = ", ".join(f"{name} {_version(name)}" for name in
                                 ("taskman", "grpcio", "protobuf", "gevent", "supervisor",
                                  "py-spy"))
    info["commit"] = _git_commit()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.machine()


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cgroup_layout() -> str:
    mounts = []
    with contextlib.suppress(OSError):
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                if fields[2] == "cgroup2":
                    mounts.append(f"cgroup2 at {fields[1]}")
                elif fields[2] == "cgroup":
                    controllers = [option for option in fields[3].split(",")
                                   if option not in ("rw", "ro", "nosuid", "nodev", "noexec",
                                                     "relatime")]
                    mounts.append(f"v1 {','.join(controllers)}")
    if any(mount.startswith("v1") for mount in mounts):
        layout = "hybrid (v1 controllers + cgroup2)" if any(
            mount.startswith("cgroup2") for mount in mounts) else "legacy v1"
    else:
        layout = "unified v2"
    return f"{layout}: {'; '.join(mounts)}"


def _version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "-C", common.REPO_DIR, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", common.REPO_DIR, "status", "--porcelain",
                                "--untracked-files=no", "taskman"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" (taskman/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _target(met: Optional[bool]) -> str:
    if met is None:
        return "n/a"
    return "met" if met else "**not met**"


def render(bench: Bench, info: Dict[str, str], command: str, failures: Dict[str, str]) -> str:
    results = bench.results
    args = bench.args
    out: List[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add("Generated by `" + command + "` — do not edit by hand; rerun it (3-6 minutes; "
        "`--quick` for a one-minute smoke run; `tox -e bench` does the same). Every number "
        "below comes from one run on one machine: read the **ratios**, which compare "
        "measurements taken side by side in that run; absolute times on a shared 2-core "
        "machine move from run to run.")
    add("")
    add("Rows other issues record (fair sharing, the sandbox's start cost, before/after "
        "comparisons) are in [benchmark-history.md](benchmark-history.md), which this bench "
        "never overwrites.\n")
    add("## Machine")
    add("")
    for key in ("date", "cpus", "memory", "kernel", "cgroups", "driver", "server", "disk",
                "python",
                "versions", "commit"):
        if key in info:
            add(f"- **{key}**: {info[key]}")
    add("")
    add("## Summary")
    add("")
    add("| what | taskman | compared with | that | ratio | target |")
    add("|---|---:|---|---:|---:|---|")
    start, status = results.get("start"), results.get("status")
    if start:
        value = ratio(start["taskman"]["p50"], start["spawn_wait"]["p50"])
        add(f"| StartTask p50 (mTLS, cgroups) | {fmt_ms(start['taskman']['p50'])} | "
            f"bare posix_spawn+wait of /bin/true | {fmt_ms(start['spawn_wait']['p50'])} | "
            f"{value:.1f}× | ≤ 3×: {_target(value <= 3)} |")
        value = ratio(start["paced"]["p50"], start["spawn_wait"]["p50"])
        add(f"| StartTask p50, 10 ms between calls | {fmt_ms(start['paced']['p50'])} | "
            f"bare posix_spawn+wait | {fmt_ms(start['spawn_wait']['p50'])} | {value:.1f}× | "
            f"≤ 3×: {_target(value <= 3)} |")
        value = ratio(start["taskman"]["p50"], start["subprocess"]["p50"])
        add(f"| StartTask p50 | {fmt_ms(start['taskman']['p50'])} | subprocess.run(/bin/true) "
            f"| {fmt_ms(start['subprocess']['p50'])} | {value:.1f}× | |")
        sustained = results.get("sustained")
        if sustained:
            add(f"| sustained starts, 4 clients | {sustained['per_second']:.0f}/s | "
                f"bare posix_spawn+wait, one after another | "
                f"{1 / start['spawn_wait']['p50']:.0f}/s | "
                f"{sustained['per_second'] * start['spawn_wait']['p50']:.2f}× | |")
    peer_result = results.get("peer")
    if start and peer_result:
        value = ratio(start["taskman"]["p50"], peer_result["api_start"]["p50"])
        add(f"| StartTask p50 | {fmt_ms(start['taskman']['p50'])} | supervisord startProcess "
            f"(XML-RPC) | {fmt_ms(peer_result['api_start']['p50'])} | {value:.1f}× | |")
    if peer_result and "taskman_ctl_start" in peer_result:
        value = ratio(peer_result["taskman_ctl_start"]["p50"], peer_result["ctl_start"]["p50"])
        add(f"| `taskman start` CLI p50 | {fmt_ms(peer_result['taskman_ctl_start']['p50'])} | "
            f"`supervisorctl start` | {fmt_ms(peer_result['ctl_start']['p50'])} | "
            f"{value:.1f}× | |")
        if "cli_floor" in peer_result:
            value = ratio(peer_result["taskman_ctl_start"]["p50"], peer_result["cli_floor"]["p50"])
            add(f"| `taskman start` CLI p50 vs its floor | "
                f"{fmt_ms(peer_result['taskman_ctl_start']['p50'])} | `python -c 'import grpc'` | "
                f"{fmt_ms(peer_result['cli_floor']['p50'])} | {value:.1f}× | |")
    if status and peer_result:
        value = ratio(status["taskman"]["p50"], peer_result["api_status"]["p50"])
        add(f"| GetTaskStatus p50 | {fmt_ms(status['taskman']['p50'])} | supervisord "
            f"getProcessInfo | {fmt_ms(peer_result['api_status']['p50'])} | {value:.1f}× | |")
    stream = results.get("stream")
    if stream:
        value = ratio(stream["live"]["rate"], stream["ceiling"]["rate"])
        add(f"| 1 follower of a live task, {fmt_mib(stream['bytes'])} | "
            f"{fmt_rate(stream['live']['rate'])} | transport ceiling (bare gRPC, same TLS) | "
            f"{fmt_rate(stream['ceiling']['rate'])} | {value:.2f}× | ≥ 0.8×: "
            f"{_target(value >= 0.8)} |")
        value = ratio(stream["replay"]["rate"], stream["ceiling"]["rate"])
        add(f"| 1 follower of the finished task (from disk) | "
            f"{fmt_rate(stream['replay']['rate'])} | transport ceiling | "
            f"{fmt_rate(stream['ceiling']['rate'])} | {value:.2f}× | ≥ 0.8×: "
            f"{_target(value >= 0.8)} |")
        live_extra = stream["live"]["extra"]
        task_rate = stream["bytes"] / live_extra["task_seconds"]
        value = ratio(stream["live"]["rate"], task_rate)
        add(f"| 1 follower of a live task | {fmt_rate(stream['live']['rate'])} | the task's own "
            f"write pace (cgroup CPU quota) | {fmt_rate(task_rate)} | {value:.2f}× | |")
        value = ratio(stream["live"]["rate"], stream["pipe"]["rate"])
        add(f"| 1 follower of a live task | {fmt_rate(stream['live']['rate'])} | a plain pipe "
            f"| {fmt_rate(stream['pipe']['rate'])} | {value:.2f}× | |")
    if peer_result and "taskman_cli_stream" in peer_result:
        tail = peer_result["tail"]
        tail_rate = tail["bytes"] / tail["seconds"]
        cli_rate = peer_result["taskman_cli_stream"]["rate"]
        add(f"| `taskman stream` CLI | {fmt_rate(cli_rate)} | `supervisorctl tail -f` | "
            f"{tail_rate / 1024:.0f} KiB/s | {ratio(cli_rate, tail_rate):.0f}× | |")
    fanout = results.get("fanout")
    if fanout:
        ceiling_rate = stream["ceiling"]["rate"] if stream else float("nan")
        for row in fanout["rows"]:
            target = ""
            if row["followers"] >= 1000:
                met = row["exact"] == row["followers"] and row["rss_peak"] <= 200 * MiB
                target = f"all exact, RSS ≤ 200 MiB: {_target(met)}"
            add(f"| {row['followers']} followers × {fmt_mib(row['bytes_each'])} | "
                f"{fmt_rate(row['aggregate'])} aggregate, {row['exact']}/{row['followers']} "
                f"byte-exact, RSS peak {fmt_mib(row['rss_peak'])} | transport ceiling, one "
                f"stream | {fmt_rate(ceiling_rate)} | {ratio(row['aggregate'], ceiling_rate):.2f}× "
                f"| {target} |")
    memory = results.get("memory")
    if memory:
        for mode, row in memory.items():
            growth = row["rss_peak"] - row["rss_start"]
            add(f"| RSS while a task writes {fmt_mib(row['bytes'])}, {mode} | "
                f"+{growth / MiB:.1f} MiB (peak {fmt_mib(row['rss_peak'])}) | RSS before | "
                f"{fmt_mib(row['rss_start'])} | | flat within 20 MiB: "
                f"{_target(growth <= 20 * MiB)} |")
    add("")
    for name, error in failures.items():
        add(f"- **{name} failed**: `{error}`")
    for note in bench.notes:
        add(f"- {note}")
    if failures or bench.notes:
        add("")

    if start:
        add("## 1. Start latency")
        add("")
        add(f"{start['taskman']['n']} StartTask(/bin/true) calls through `taskman.client` over "
            "mTLS, each waiting for the reply (the task's cgroups made, the process placed "
            "and released), interleaved in 5 rounds with the same number of bare spawns from "
            "the bench process (Python's `os.posix_spawn`, then `waitpid`).")
        add("")
        add("| | p50 | p99 | max |")
        add("|---|---:|---:|---:|")
        for key, label in (("taskman", "StartTask over mTLS"),
                           ("spawn_only", "posix_spawn (until it returns)"),
                           ("spawn_wait", "posix_spawn + waitpid"),
                           ("subprocess", "subprocess.run")):
            row = start[key]
            add(f"| {label} | {fmt_ms(row['p50'])} | {fmt_ms(row['p99'])} | "
                f"{fmt_ms(row['max'])} |")
        row = start["paced"]
        add(f"| StartTask, 10 ms between calls | {fmt_ms(row['p50'])} | {fmt_ms(row['p99'])} | "
            f"{fmt_ms(row['max'])} |")
        breakdown = start.get("breakdown")
        if breakdown:
            add("")
            add(f"Where a start goes (bench/breakdown.py: `TaskManager.start` in a gevent "
                f"process of its own, same driver, {breakdown['count']} starts, p50 of each "
                "step; steps nest as indented):")
            add("")
            add("| step | p50 |")
            add("|---|---:|")
            add(f"| StartTask over mTLS (above, back to back) | {fmt_ms(start['taskman']['p50'])} |")
            add(f"| StartTask over mTLS, paced | {fmt_ms(start['paced']['p50'])} |")
            add(f"| `TaskManager.start`, in-process | {fmt_ms(breakdown['manager_start'])} |")
            for label, value in breakdown["steps"].items():
                indent = "&nbsp;&nbsp;&nbsp;&nbsp;" * (2 if label.startswith(("posix_spawn",
                                                                             "cgroup place"))
                                                       else 1)
                add(f"| {indent}{label} | {fmt_ms(value)} |")
            add(f"| bare posix_spawn+wait in that process | {fmt_ms(breakdown['bare_spawn_wait'])} |")
            if status:
                add(f"| a unary RPC's own cost (GetTaskStatus p50, section 2) | "
                    f"{fmt_ms(status['taskman']['p50'])} |")
        sustained = results.get("sustained")
        if sustained:
            add("")
            add(f"Sustained: {sustained['per_second']:.0f} starts/s from 4 concurrent clients "
                f"(separate processes and connections, {sustained['count']} starts in "
                f"{sustained['seconds']:.1f} s; latency under that load p50 "
                f"{fmt_ms(sustained['latency']['p50'])}, p99 "
                f"{fmt_ms(sustained['latency']['p99'])}); server CPU "
                f"{fmt_ms(sustained['server_cpu_per_start'])} per start.")
        add("")
    if status:
        add("## 2. Status latency")
        add("")
        row = status["taskman"]
        add(f"GetTaskStatus of a finished task, {row['n']} calls: p50 {fmt_ms(row['p50'])}, "
            f"p99 {fmt_ms(row['p99'])}, max {fmt_ms(row['max'])}.")
        add("")
    if stream:
        add("## 3. One follower")
        add("")
        add(f"A task writing {fmt_mib(stream['bytes'])} (`head -c N /dev/zero`), followed "
            "from its start by one client (grpc asyncio, 64 KiB messages); median of "
            f"{stream['repeats']} interleaved repeats. *Live*: the follower attaches as the "
            "task starts. *From disk*: the same finished task followed again. *Pipe*: the "
            "same command into a plain pipe read by the bench. *Ceiling*: the same bytes as "
            "64 KiB messages from bench/ceiling.py, a bare gRPC server (same certificates, "
            "same gevent set-up, no task behind it), followed by the same client code.")
        add("")
        add("| | throughput | runs | time to first byte |")
        add("|---|---:|---|---:|")
        for key, label in (("pipe", "plain pipe"), ("ceiling", "transport ceiling"),
                           ("live", "taskman, live"), ("replay", "taskman, from disk")):
            row = stream[key]
            runs = ", ".join(f"{rate / MiB:.0f}" for rate in row["rates"])
            add(f"| {label} | {fmt_rate(row['rate'])} | {runs} | {fmt_ms(row['ttfb'])} |")
        live = stream["live"]["extra"]
        add("")
        add(f"The live task itself ran for {live['task_seconds']:.2f} s "
            f"({fmt_rate(stream['bytes'] / live['task_seconds'])} into taskman's pipe, under "
            "its cgroup's CPU quota); server CPU per GiB streamed: live "
            f"{live['server_cpu'] / stream['bytes'] * GiB:.2f} s (reading the pipe, writing "
            f"the file and sending), from disk "
            f"{stream['replay']['extra']['server_cpu'] / stream['bytes'] * GiB:.2f} s, the "
            f"ceiling server {stream['ceiling']['extra']['server_cpu'] / stream['bytes'] * GiB:.2f}"
            f" s; server "
            f"RSS peak {fmt_mib(live['rss_peak'])}.")
        add("")
    if fanout:
        add("## 4. Fan-out")
        add("")
        add("N followers of one task (`head -c SIZE` of a random file, so every follower's "
            "SHA-256 is checked against the file's), each its own mTLS connection, in up to "
            "4 client processes; all connect first, then the task starts and every follower "
            "opens its stream at once. Aggregate = N × size / (task start → last follower "
            "done). Time to first byte: stream opened → first message, per follower.")
        add("")
        add("| followers | size each | byte-exact | errors | task time | aggregate | TTFB p50 | "
            "TTFB p99 | connect all | RSS idle | RSS connected | RSS peak |")
        add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in fanout["rows"]:
            add(f"| {row['followers']} | {fmt_mib(row['bytes_each'])} | {row['exact']} | "
                f"{row['errors']} | {row['task_seconds']:.2f} s | {fmt_rate(row['aggregate'])} | "
                f"{fmt_ms(row['ttfb_p50'])} | "
                f"{fmt_ms(row['ttfb_p99'])} | {row['connect_seconds']:.1f} s | "
                f"{fmt_mib(row['rss_idle'])} | {fmt_mib(row['rss_connected'])} | "
                f"{fmt_mib(row['rss_peak'])} |")
        for row in fanout["rows"]:
            if row["error_samples"]:
                add("")
                add(f"Errors with {row['followers']} followers: `{row['error_samples']}`")
        add("")
    if memory:
        add("## 5. Memory while a task writes")
        add("")
        add("Server RSS sampled every 250 ms while a task writes with nobody reading, then "
            "with one stalled reader (opens the stream, reads nothing). The output goes to "
            "the task's file on disk; the bench deletes it after each run. Meanwhile the "
            "bench polls GetTaskStatus every 50 ms: its latency shows whether writing the "
            "file blocks the server's event loop.")
        add("")
        add("| reader | bytes written | kept on disk | task time | RSS before | RSS peak | RSS end | "
            "status p50 | status p99 | status max |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mode, row in memory.items():
            add(f"| {mode} | {fmt_mib(row['bytes'])} | {fmt_mib(row['kept'])} | "
                f"{row['task_seconds']:.1f} s | "
                f"{fmt_mib(row['rss_start'])} | {fmt_mib(row['rss_peak'])} | "
                f"{fmt_mib(row['rss_end'])} | {fmt_ms(row['status']['p50'])} | "
                f"{fmt_ms(row['status']['p99'])} | {fmt_ms(row['status']['max'])} |")
        add("")
    if peer_result:
        add("## 6. supervisord side by side")
        add("")
        add(f"supervisord {peer_result['version']} with its own config, socket and logs in the "
            "bench's temp directory, programs preconfigured (`autostart=false`, "
            "`startsecs=0`), killed at the end. Its API is XML-RPC over a unix socket, no TLS, "
            "no cgroups: a lighter path than taskman's by design.")
        add("")
        add("| | taskman | supervisord | ratio |")
        add("|---|---:|---:|---:|")
        if start:
            add(f"| start via the API, p50 | {fmt_ms(start['taskman']['p50'])} | "
                f"{fmt_ms(peer_result['api_start']['p50'])} | "
                f"{ratio(start['taskman']['p50'], peer_result['api_start']['p50']):.1f}× |")
            add(f"| start via the API, p99 | {fmt_ms(start['taskman']['p99'])} | "
                f"{fmt_ms(peer_result['api_start']['p99'])} | "
                f"{ratio(start['taskman']['p99'], peer_result['api_start']['p99']):.1f}× |")
        if status:
            add(f"| status via the API, p50 | {fmt_ms(status['taskman']['p50'])} | "
                f"{fmt_ms(peer_result['api_status']['p50'])} | "
                f"{ratio(status['taskman']['p50'], peer_result['api_status']['p50']):.1f}× |")
        if "taskman_ctl_start" in peer_result:
            add(f"| start via the CLI, p50 | {fmt_ms(peer_result['taskman_ctl_start']['p50'])} | "
                f"{fmt_ms(peer_result['ctl_start']['p50'])} | "
                f"{ratio(peer_result['taskman_ctl_start']['p50'], peer_result['ctl_start']['p50']):.1f}× |")  # noqa: E501
        tail = peer_result["tail"]
        tail_rate = tail["bytes"] / tail["seconds"]
        if "taskman_cli_stream" in peer_result:
            cli = peer_result["taskman_cli_stream"]
            add(f"| follow a live {fmt_mib(peer_result['bytes'])} writer via the CLI | "
                f"{fmt_rate(cli['rate'])} (`taskman stream`, {fmt_mib(cli['bytes'])} in "
                f"{cli['seconds']:.1f} s) | {tail_rate / 1024:.0f} KiB/s (`tail -f`, "
                f"{tail['bytes'] / 1024:.0f} KiB in {tail['seconds']:.1f} s) | "
                f"{ratio(cli['rate'], tail_rate):.0f}× |")
        alone = peer_result["writer_alone"]
        add("")
        add(f"Under supervisord the writer alone logged {fmt_mib(alone['bytes'])} in "
            f"{alone['seconds']:.1f} s; with `supervisorctl tail -f` attached for "
            f"{tail['seconds']:.1f} s the writer logged {fmt_mib(tail['writer_bytes'])} "
            f"({'finished' if tail['writer_finished'] else 'not finished'}) while tail -f "
            f"delivered {tail['bytes'] / 1024:.0f} KiB (first byte after "
            f"{fmt_ms(tail['ttfb'] or float('nan'))}; tail -f starts at the last KiB and never "
            "ends by itself, so the bench stops it). supervisord RSS "
            f"{fmt_mib(peer_result['supervisord_rss'][0])} before, "
            f"{fmt_mib(peer_result['supervisord_rss'][1])} peak during tail -f.")
        add("")
    profile = results.get("profile")
    if profile:
        add("## 7. Where the server's time goes")
        add("")
        add(f"py-spy {_version('py-spy')} attached to the running server (`record --threads "
            f"--nonblocking`, {profiling.RATE} Hz) for {args.profile_seconds:.0f} s of each "
            "load. Shares are of the main thread's *busy* samples (the thread running every "
            "greenlet; samples with the gevent hub waiting in its loop are left out). Other "
            "threads are gevent's native pool, where gRPC blocks polling its completion queue.")
        add("")
        for key, title in (("start", "StartTask in a loop (one client)"),
                           ("stream", "one follower replaying a finished task")):
            summary = profile[key]
            busy_share = ratio(summary["busy"], summary["samples"]) * 100
            if key == "start":
                detail = (f"{summary['calls']} calls, server CPU "
                          f"{fmt_ms(summary['cpu_per_call'])} per call")
            else:
                detail = (f"{fmt_mib(summary['bytes'])} streamed, server CPU "
                          f"{summary['cpu_per_gib']:.2f} s per GiB")
            add(f"### {title}")
            add("")
            add(f"{detail}; main thread busy in {busy_share:.0f}% of its "
                f"{summary['samples']} samples.")
            add("")
            add("Inclusive (on the stack):")
            add("")
            out.extend(profiling.table(summary, "inclusive", 15))
            add("")
            add("Self (at the top of the stack):")
            add("")
            out.extend(profiling.table(summary, "self", 10))
            add("")
    if os.path.exists(FINDINGS):
        with open(FINDINGS) as handle:
            add(handle.read().rstrip())
        add("")
    return "\n".join(out) + "\n"


def _measuring_args(argv: List[str]) -> List[str]:
    """The command line without the options that only say where results go."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--output", "--json"):
            skip = True
            continue
        if word.startswith(("--output=", "--json=")):
            continue
        kept.append(shlex.quote(word))
    return kept


SECTIONS = ("start", "status", "stream", "fanout", "memory", "peer", "profile")


def rerender(args: argparse.Namespace) -> int:
    """Write the report again from a --json file (after editing bench/findings.md)."""
    with open(args.render) as handle:
        saved = json.load(handle)
    args.profile_seconds = saved.get("profile_seconds", args.profile_seconds)
    bench = Bench(args, "")
    bench.results = saved["results"]
    bench.notes = saved.get("notes", [])
    report = render(bench, saved["machine"], saved.get("command", "python bench/run.py"),
                    saved.get("failures", {}))
    with open(args.output, "w") as handle:
        handle.write(report)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return rerender(args)
    only = [name for name in args.only.split(",") if name] or list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("warning: not root: the default cgroup driver will refuse to start",
              file=sys.stderr)
    # 1,000 followers: a socket each in the server (which inherits this limit)
    # and in the clients, plus the task's files.
    common.raise_nofile(max(args.fanout, default=1) * 4 + 4096)
    command = "python bench/run.py" + "".join(" " + word for word in _measuring_args(
        sys.argv[1:] if argv is None else argv))
    from taskman.client import TaskmanClient

    common.certs_dir()  # one PKI for the servers and the workers, made before any starts
    workdir = tempfile.mkdtemp(prefix="taskman-bench-", dir=args.tmpdir)
    bench = Bench(args, workdir)
    failures: Dict[str, str] = {}
    info: Dict[str, str] = {}
    began = time.monotonic()
    try:
        script = _script("taskman-server", args.server)
        bench.server = TaskmanServer(workdir, script, max(args.fanout, default=1) + 100)
        bench.ceiling = CeilingServer(workdir)
        with bench.server, bench.ceiling:
            bench.log(f"taskman-server pid {bench.server.pid} on {bench.server.address}; "
                      f"ceiling on {bench.ceiling.address}; temp dir {workdir}")
            info = machine(workdir, bench.server)
            with TaskmanClient(bench.server.address, USER) as client:
                bench.client = client
                for name in SECTIONS:
                    if name not in only:
                        continue
                    try:
                        getattr(bench, "bench_" + name)()
                    except Exception as error:  # the report says what failed; go on
                        traceback.print_exc()
                        failures[name] = f"{type(error).__name__}: {error}"
                    finally:
                        bench.close_workers()
    finally:
        bench.close_workers()
        shutil.rmtree(workdir, ignore_errors=True)
    bench.notes.append(f"Whole run: {(time.monotonic() - began) / 60:.1f} minutes.")
    report = render(bench, info, command, failures)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        handle.write(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "results": bench.results, "failures": failures,
                       "notes": bench.notes, "command": command,
                       "profile_seconds": args.profile_seconds},
                      handle, indent=1, default=str)
    bench.log(f"wrote {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
