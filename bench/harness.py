"""What every section of a bench run shares: the options, the servers and
clients, the results so far, and the worker processes to stop afterwards."""

import argparse
import sys
import time
from typing import Dict, List, Optional

import common

USER = "client001"


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str):
        self.args = args
        self.workdir = workdir
        self.results: Dict[str, dict] = {}
        self.notes: List[str] = []
        self.server = None  # servers.TaskmanServer
        self.ceiling = None  # servers.CeilingServer
        self.client = None  # taskman.client.TaskmanClient as USER (its tasks are sandboxed)
        self.unconfined_client = None  # as servers.UNCONFINED_USER (tasks mapped to root)
        self.ceiling_client = None  # the same client code, talking to the ceiling
        self.workers: List[common.Worker] = []

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def worker(self, *args: str, env: Optional[Dict[str, str]] = None) -> common.Worker:
        """bench/worker.py with ``args``, stopped by close_workers."""
        worker = common.Worker(list(args), env=env)
        self.workers.append(worker)
        return worker

    def close_workers(self) -> None:
        while self.workers:
            self.workers.pop().close()

    def wait_ended(self, task_id: str, timeout: float, poll: float = 0.05,
                   latencies: Optional[List[float]] = None, client=None):
        """Poll GetTaskStatus until the task ended; optionally record each call's latency."""
        client = client or self.client
        deadline = time.monotonic() + timeout
        while True:
            began = time.perf_counter()
            status = client.status(task_id)
            if latencies is not None:
                latencies.append(time.perf_counter() - began)
            if not status.running:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still running after {timeout}s")
            time.sleep(poll)


def follow(worker: common.Worker, task_id: str, size: int) -> dict:
    """One follower (a bench/worker.py follow process) reads ``task_id`` to the end."""
    worker.send({"task_id": task_id})
    reply = worker.receive(900)
    if reply["error_count"]:
        raise RuntimeError(f"follower failed: {reply['errors']}")
    follower = reply["followers"][0]
    if follower["bytes"] != size:
        raise RuntimeError(f"follower got {follower['bytes']} bytes, expected {size}")
    seconds = follower["ended"] - follower["opened"]
    return {"bytes": follower["bytes"], "seconds": seconds, "rate": follower["bytes"] / seconds,
            "ttfb": follower["ttfb"], "messages": follower.get("messages")}
