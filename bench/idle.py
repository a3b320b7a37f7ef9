"""Idle followers: thousands of connections following one silent task.

The task prints one line and sleeps; each follower's stream is open once
that line has reached it. The server's RSS is read before, with every
connection open (TLS done, no call), and with every stream open, so the cost
per follower splits into what a connection costs and what a stream adds.
The server's open-files limit (inherited from the bench) and its
--max-streams are raised for the run; the per-user quotas are off.
"""

import time

import common
from common import fmt_mib

SILENT = ["sh", ["-c", "echo ready; exec sleep 3600"]]
PER_PROCESS = 2500


def section_idle(bench) -> None:
    count = bench.args.idle_followers
    task_id = bench.client.start(*SILENT)
    try:
        processes = max(1, -(-count // PER_PROCESS))
        shares = [count // processes + (1 if index < count % processes else 0)
                  for index in range(processes)]
        time.sleep(1)
        rss_before = common.rss_bytes(bench.server.pid)
        began = time.perf_counter()
        clients = [bench.client_process("idle", bench.server.address, str(share), task_id)
                   for share in shares]
        connected = [client.receive(900) for client in clients]
        connect_seconds = time.perf_counter() - began
        rss_connected = _settled(bench.server.pid)
        began = time.perf_counter()
        for client in clients:
            client.send({"go": True})
        streaming = [client.receive(900) for client in clients]
        open_seconds = time.perf_counter() - began
        rss_streams = _settled(bench.server.pid)
        opened = sum(reply["streaming"] for reply in streaming)
        errors = [error for reply in streaming for error in reply["errors"]]
    finally:
        bench.close_workers()
        bench.client.stop(task_id, wait=10)
    bench.results["idle"] = {
        "followers": count, "open": opened, "errors": errors[:3], "client_processes": len(shares),
        "rss_before": rss_before, "rss_connected": rss_connected, "rss_streams": rss_streams,
        "per_connection": (rss_connected - rss_before) / count,
        "per_stream": (rss_streams - rss_connected) / count,
        "per_follower": (rss_streams - rss_before) / count,
        "connect_seconds": connect_seconds, "handshake_seconds": max(r["seconds"] for r in connected),
        "open_seconds": open_seconds}
    bench.log(f"idle: {opened}/{count} followers open, rss {fmt_mib(rss_before)} -> "
              f"{fmt_mib(rss_connected)} connected -> {fmt_mib(rss_streams)} streaming "
              f"({(rss_streams - rss_before) / count / 1024:.0f} KiB each)")


def _settled(pid: int, seconds: float = 2.0) -> int:
    """The largest RSS seen over ``seconds`` (allocations land a little late)."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, common.rss_bytes(pid))
        time.sleep(0.1)
    return peak

