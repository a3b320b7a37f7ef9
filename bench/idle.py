"""Idle followers: thousands of connections following one silent task.

Both servers are fresh (started for this section), so the RSS before is an
empty server's. The task prints one line and sleeps; each follower's stream is open once
that line has reached it. The server's RSS is read before, with every
connection open (TLS done, no call), and with every stream open, so the cost
per follower splits into what a connection costs and what a stream adds.
The server's open-files limit (inherited from the bench) and its
--max-streams are raised for the run; the per-user quotas are off.
"""

import os
import time

import common
from common import fmt_mib
from harness import USER
from servers import CeilingServer, TaskmanServer

SILENT = ["sh", ["-c", "echo ready; exec sleep 3600"]]
PER_PROCESS = 2500


def section_idle(bench) -> None:
    """On a fresh taskman-server (the bench's own keeps the RSS of the
    sections before), then on a fresh bare server."""
    from taskman.client import TaskmanClient

    count = bench.args.idle_followers
    directory = os.path.join(bench.workdir, "idle")
    os.makedirs(directory)
    server = TaskmanServer(directory, bench.server.script, count + 100, cgroup_root="taskman-bench-idle")
    with server, TaskmanClient(server.address, USER) as client:
        task_id = client.start(*SILENT)
        try:
            result = _idle_followers(bench, server, task_id, count)
        finally:
            client.stop(task_id, wait=10)
    bench.results["idle"] = result
    with CeilingServer(bench.workdir, "idle-ceiling") as ceiling:
        result["ceiling"] = _idle_followers(bench, ceiling, "idle", count)


def _idle_followers(bench, server, task_id: str, count: int) -> dict:
    """``count`` followers of ``task_id`` on ``server``: RSS, descriptors, times."""
    processes = max(1, -(-count // PER_PROCESS))
    shares = [count // processes + (1 if index < count % processes else 0) for index in range(processes)]
    try:
        time.sleep(1)
        rss_before = common.rss_bytes(server.pid)
        fds_before = open_files(server.pid)
        began = time.perf_counter()
        clients = [bench.worker("idle", server.address, str(share), task_id) for share in shares]
        connected = [client.receive(900) for client in clients]
        connect_seconds = time.perf_counter() - began
        rss_connected = _settled(server.pid)
        fds_connected = open_files(server.pid)
        began = time.perf_counter()
        for client in clients:
            client.send({"go": True})
        streaming = [client.receive(900) for client in clients]
        open_seconds = time.perf_counter() - began
        rss_streams = _settled(server.pid)
        fds_streams = open_files(server.pid)
        opened = sum(reply["streaming"] for reply in streaming)
        errors = [error for reply in streaming for error in reply["errors"]]
    finally:
        bench.close_workers()
    name = "the ceiling" if isinstance(server, CeilingServer) else "taskman"
    if opened < count and name == "taskman":
        complaints = [line for line in server.log().splitlines() if " ERROR " in line]
        bench.notes.append(f"Idle followers: {count - opened} of taskman's {count} streams did not open; "
                           f"the server's last errors: `{complaints[-3:]}`")
    bench.log(f"idle ({name}): {opened}/{count} followers open, rss {fmt_mib(rss_before)} -> "
              f"{fmt_mib(rss_connected)} connected -> {fmt_mib(rss_streams)} streaming "
              f"({(rss_streams - rss_before) / count / 1024:.0f} KiB each)")
    return {"followers": count, "open": opened, "errors": errors[:3], "client_processes": len(shares),
            "rss_before": rss_before, "rss_connected": rss_connected, "rss_streams": rss_streams,
            "per_connection": (rss_connected - rss_before) / count,
            "per_stream": (rss_streams - rss_connected) / count,
            "per_follower": (rss_streams - rss_before) / count,
            "files": [fds_before, fds_connected, fds_streams],
            "connect_seconds": connect_seconds, "handshake_seconds": max(r["seconds"] for r in connected),
            "open_seconds": open_seconds}


def open_files(pid: int) -> int:
    """How many descriptors ``pid`` has open."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _settled(pid: int, seconds: float = 2.0) -> int:
    """The largest RSS seen over ``seconds`` (allocations land a little late)."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, common.rss_bytes(pid))
        time.sleep(0.1)
    return peak

