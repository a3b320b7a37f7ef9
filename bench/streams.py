"""Output streams: one follower against the transport ceiling, fan-out to
many followers (and the same fan-out from the bare ceiling server), and the
server's memory while a task writes a lot."""

import hashlib
import os
import shutil
import subprocess
import time
from typing import Dict, List

import common
from common import GiB, MiB, fmt_mib, fmt_ms, fmt_rate, median, percentile, stats
from harness import USER, follow
from servers import UNCONFINED_USER, CeilingServer, TaskmanServer

# The live task's CPU quota in section 4: none. Under the default quota (20%
# of a CPU) `head` wrote only ~224 MiB/s into its pipe, so the live follower
# measured the quota (1.12x the writer's pace), not the server.
STREAM_CPU_QUOTA_US = 0


def section_stream(bench) -> None:
    """One follower of a live task, of the same task from disk, of the same
    bytes from the ceiling, and the same writer into a plain pipe.

    The taskman rows come from a taskman-server started for this section,
    the bench's own with the task CPU quota lifted (every other section
    keeps the default limits)."""
    from taskman.client import TaskmanClient

    directory = os.path.join(bench.workdir, "stream")
    os.makedirs(directory)
    server = TaskmanServer(directory, bench.server.script, 100, cgroup_root="taskman-bench-stream",
                           options=["--cpu-quota-us", str(STREAM_CPU_QUOTA_US)])
    with server, TaskmanClient(server.address, USER) as client:
        _stream_rounds(bench, server, client)
    bench.results["stream"]["task_cpu_quota_us"] = STREAM_CPU_QUOTA_US


def _stream_rounds(bench, server, client) -> None:
    size = bench.args.stream_bytes
    command = ["head", "-c", str(size), "/dev/zero"]
    taskman_follower = bench.worker("follow", server.address, "1")
    ceiling_follower = bench.worker("follow", bench.ceiling.address, "1")
    taskman_follower.receive(60)
    ceiling_follower.receive(60)
    runs: Dict[str, List[dict]] = {"pipe": [], "ceiling": [], "live": [], "replay": []}
    for repeat in range(bench.args.repeats):
        runs["pipe"].append(pipe_read(command))
        cpu_before = common.cpu_seconds(bench.ceiling.pid)
        ceiling = follow(ceiling_follower, str(size), size)
        ceiling["server_cpu"] = common.cpu_seconds(bench.ceiling.pid) - cpu_before
        runs["ceiling"].append(ceiling)
        with common.RssSampler(server.pid) as rss:
            cpu_before = common.cpu_seconds(server.pid)
            task_id = client.start(command[0], command[1:])
            live = follow(taskman_follower, task_id, size)
            status = bench.wait_ended(task_id, 60, client=client)
            live["task_seconds"] = (status.end_time - status.start_time).total_seconds()
            live["server_cpu"] = common.cpu_seconds(server.pid) - cpu_before
            cpu_before = common.cpu_seconds(server.pid)
            replay = follow(taskman_follower, task_id, size)
            replay["server_cpu"] = common.cpu_seconds(server.pid) - cpu_before
        live["rss_peak"] = replay["rss_peak"] = rss.peak
        runs["live"].append(live)
        runs["replay"].append(replay)
        server.discard_output(task_id)
        bench.log(f"stream {repeat + 1}/{bench.args.repeats}: pipe "
                  f"{fmt_rate(runs['pipe'][-1]['rate'])}, ceiling "
                  f"{fmt_rate(runs['ceiling'][-1]['rate'])}, live "
                  f"{fmt_rate(live['rate'])}, replay {fmt_rate(replay['rate'])}")
    bench.close_workers()
    bench.results["stream"] = {
        "bytes": size, "repeats": bench.args.repeats,
        **{name: {"rate": median([run["rate"] for run in values]),
                  "rates": [run["rate"] for run in values],
                  "ttfb": median([run["ttfb"] for run in values]),
                  "extra": values[len(values) // 2]}
           for name, values in runs.items()},
        # Each live follow against the ceiling's run just before it: the
        # ceiling alone moved 230-580 MiB/s between rounds of one run
        # (docs/benchmark-history.md), so a ratio of two medians taken
        # rounds apart says more about the machine than about taskman.
        "ratios": [live["rate"] / ceiling["rate"]
                   for live, ceiling in zip(runs["live"], runs["ceiling"], strict=True)]}


def pipe_read(command: List[str]) -> dict:
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


def section_fanout(bench) -> None:
    """N followers of one task reading a random file; at 1,000, the same
    followers read the same bytes from a fresh ceiling server too."""
    largest = min(bench.args.fanout_max, bench.args.fanout_budget)
    # The task reads the file, so it runs as the identity mapped to root (a
    # sandboxed task has a private /tmp and could not see it).
    data_path = os.path.join(bench.workdir, "fanout.data")
    write_random(data_path, largest)
    rows = []
    ceiling_row = None
    for count in bench.args.fanout:
        size = max(MiB // 4, min(bench.args.fanout_max, bench.args.fanout_budget // count))
        size = min(size, largest)
        if count == max(bench.args.fanout):
            with CeilingServer(bench.workdir, "fanout-ceiling") as ceiling:
                ceiling_row = _fanout_once(bench, count, size, data_path, ceiling)
            # On a fresh taskman-server too, so both RSS columns start from an
            # empty server: the bench's own keeps what the sections before
            # it left (about 50 MiB more in a full run).
            rows.append(_fanout_fresh(bench, count, size, data_path))
            continue
        rows.append(_fanout_once(bench, count, size, data_path))
    os.unlink(data_path)
    bench.results["fanout"] = {"rows": rows, "ceiling": ceiling_row}


def _fanout_fresh(bench, count: int, size: int, data_path: str) -> dict:
    """``_fanout_once`` on a taskman-server started for it."""
    from taskman.client import TaskmanClient

    directory = os.path.join(bench.workdir, "fanout-fresh")
    os.makedirs(directory)
    server = TaskmanServer(directory, bench.server.script, count + 100,
                           cgroup_root="taskman-bench-fanout")
    with server, TaskmanClient(server.address, UNCONFINED_USER) as client:
        row = _fanout_once(bench, count, size, data_path, server=server, client=client)
    row["fresh_server"] = True
    return row


def _fanout_once(bench, count: int, size: int, data_path: str, ceiling=None, server=None,
                 client=None) -> dict:
    expected = sha256_prefix(data_path, size)
    processes = min(4, max(1, (count + 249) // 250))
    shares = [count // processes + (1 if index < count % processes else 0)
              for index in range(processes)]
    server = server or bench.server
    client = client or bench.unconfined_client
    target = ceiling if ceiling is not None else server
    environment = dict(os.environ, BENCH_USER=UNCONFINED_USER)
    rss_idle = common.rss_bytes(target.pid)
    began_connect = time.perf_counter()
    workers = [bench.worker("follow", target.address, str(share), "--hash", env=environment)
               for share in shares]
    connected = [worker.receive(300) for worker in workers]
    connect_seconds = time.perf_counter() - began_connect
    rss_connected = common.rss_bytes(target.pid)
    with common.RssSampler(target.pid, interval=0.05) as rss:
        began_wall = time.time()
        if ceiling is None:
            task_id = client.start("head", ["-c", str(size), data_path])
        else:
            task_id = f"{size}@{data_path}"
        for worker in workers:
            worker.send({"task_id": task_id})
        replies = [worker.receive(900) for worker in workers]
    bench.close_workers()
    followers = [follower for reply in replies for follower in reply["followers"]]
    errors = sum(reply["error_count"] for reply in replies)
    error_samples = [error for reply in replies for error in reply["errors"]]
    exact = sum(1 for follower in followers
                if follower["bytes"] == size and follower["sha256"] == expected)
    finished = max(reply["go_wall"] + max(f["ended"] for f in reply["followers"])
                   for reply in replies if reply["followers"])
    elapsed = finished - began_wall
    ttfbs = [follower["ttfb"] for follower in followers if follower["ttfb"] is not None]
    task_seconds = None
    if ceiling is None:
        status = bench.wait_ended(task_id, 60, client=client)
        server.discard_output(task_id)
        task_seconds = (status.end_time - status.start_time).total_seconds()
    row = {"followers": count, "bytes_each": size, "task_seconds": task_seconds, "exact": exact,
           "errors": errors, "error_samples": error_samples[:3], "seconds": elapsed,
           "aggregate": count * size / elapsed, "ttfb_p50": median(ttfbs),
           "ttfb_p99": percentile(ttfbs, 0.99), "ttfb_max": max(ttfbs, default=float("nan")),
           "connect_seconds": connect_seconds, "client_processes": processes,
           "rss_idle": rss_idle, "rss_connected": rss_connected, "rss_peak": rss.peak,
           "handshake_seconds": max(reply["connect_seconds"] for reply in connected)}
    bench.log(f"fanout {count}{' (ceiling)' if ceiling else ''}: {exact}/{count} exact, "
              f"{fmt_rate(row['aggregate'])} aggregate, ttfb p99 {fmt_ms(row['ttfb_p99'])}, "
              f"rss peak {fmt_mib(rss.peak)}")
    return row


def write_random(path: str, size: int) -> None:
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


def sha256_prefix(path: str, size: int) -> str:
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


def section_memory(bench) -> None:
    """Server RSS while a task writes a lot, with no reader and with a stalled one."""
    size = bench.args.memory_bytes
    free = shutil.disk_usage(bench.workdir).free
    margin = 4 * GiB
    if free < size + margin:
        scaled = max(256 * MiB, (free - margin) // GiB * GiB)
        bench.notes.append(f"Memory row scaled down from {fmt_mib(size)} to {fmt_mib(scaled)}: "
                           f"{fmt_mib(free)} free on the state directory's file system.")
        size = scaled
    command = ["head", "-c", str(size), "/dev/zero"]
    rows = {}
    for mode in ("no reader", "stalled reader"):
        staller = None
        if mode == "stalled reader":
            staller = bench.worker("stall", bench.server.address)
        status_latencies: List[float] = []
        timeout = size / (20 * MiB) + 120
        with common.RssSampler(bench.server.pid, interval=0.25) as rss:
            began = time.perf_counter()
            task_id = bench.client.start(command[0], command[1:])
            if staller is not None:
                staller.send({"task_id": task_id})
                staller.receive(60)
            # Status calls while the server writes: does disk writing stall
            # the event loop (and so every other client)?
            status = bench.wait_ended(task_id, timeout, poll=0.05, latencies=status_latencies)
            elapsed = time.perf_counter() - began
        kept = os.path.getsize(bench.server.output_path(task_id))
        bench.server.discard_output(task_id)
        bench.close_workers()
        rows[mode] = {"bytes": size, "kept": kept, "seconds": elapsed,
                      "task_seconds": (status.end_time - status.start_time).total_seconds(),
                      "rss_start": rss.first, "rss_peak": rss.peak,
                      "rss_min": min(rss.samples), "rss_end": rss.samples[-1],
                      "status": stats(status_latencies)}
        bench.log(f"memory, {mode}: {fmt_mib(size)} in {elapsed:.1f}s, rss "
                  f"{fmt_mib(rss.first)} -> peak {fmt_mib(rss.peak)}")
    bench.results["memory"] = rows
