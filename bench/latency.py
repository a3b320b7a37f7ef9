"""Unary calls beside their floors: StartTask, GetTaskStatus, sustained starts.

Every taskman number here is measured interleaved with its baseline, in the
same run and through the same client code (``taskman.client``):

- the bare grpcio unary call: the same call answered at once by
  bench/ceiling.py (same certificates, same gevent set-up, nothing behind it);
- a bare spawn+wait through the sandbox gate: ``taskman-gate`` confining
  /bin/true as an unprivileged uid (namespaces, private /tmp and /proc, no
  capabilities), as a sandboxed task starts, but with no cgroups, pipes or
  record. StartTask's floor is the sum of the two;
- StartTask of an identity mapped to root (the sandbox mapped off), for the
  row against supervisord's startProcess.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import common
from common import fmt_ms, median, stats
from servers import CeilingServer

TRUE = "/bin/true"


def section_start(bench) -> None:
    samples = bench.args.start_samples
    rounds = 5
    per_round = max(1, samples // rounds)
    spawn_gate = gate_spawner()
    timed = {name: [] for name in ("sandboxed", "unconfined", "ceiling_unary", "spawn_only",
                                   "spawn_wait", "gate_spawn_wait", "subprocess")}
    calls = {"sandboxed": lambda: bench.client.start(TRUE),
             "unconfined": lambda: bench.unconfined_client.start(TRUE),
             "ceiling_unary": lambda: bench.ceiling_client.start(TRUE),
             "gate_spawn_wait": spawn_gate}
    for _ in range(20):  # warm every path
        for call in calls.values():
            call()
        bare_spawn()
    # Interleaved rounds: a burst of background load hits every side alike.
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(per_round):
                began = time.perf_counter()
                call()
                timed[name].append(time.perf_counter() - began)
        for _ in range(per_round):
            spawned, reaped = bare_spawn()
            timed["spawn_only"].append(spawned)
            timed["spawn_wait"].append(reaped)
        for _ in range(per_round // 4 or 1):
            began = time.perf_counter()
            subprocess.run([TRUE], check=True)
            timed["subprocess"].append(time.perf_counter() - began)
    # Paced: 10 ms between calls, so the previous task's end (reaping,
    # removing its groups) does not run on the loop during the next start.
    paced = []
    for _ in range(max(50, samples // 5)):
        time.sleep(0.01)
        began = time.perf_counter()
        bench.client.start(TRUE)
        paced.append(time.perf_counter() - began)
    result = {name: stats(values) for name, values in timed.items()}
    result["paced"] = stats(paced)
    result["floor"] = result["ceiling_unary"]["p50"] + result["gate_spawn_wait"]["p50"]
    bench.results["start"] = result
    try:
        result["breakdown"] = breakdown(bench.workdir, max(100, samples // 3))
    except Exception as error:  # the rows above stand without it
        bench.notes.append(f"Start breakdown failed: {type(error).__name__}: {error}")
    bench.log(f"start: sandboxed p50 {fmt_ms(result['sandboxed']['p50'])}, floor "
              f"{fmt_ms(result['floor'])} (unary {fmt_ms(result['ceiling_unary']['p50'])} + gate "
              f"{fmt_ms(result['gate_spawn_wait']['p50'])}), unconfined "
              f"{fmt_ms(result['unconfined']['p50'])}")


def bare_spawn():
    """posix_spawn /bin/true: (seconds until it returned, seconds until reaped)."""
    began = time.perf_counter()
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    spawned = time.perf_counter()
    os.waitpid(pid, 0)
    return spawned - began, time.perf_counter() - began


def gate_spawner():
    """A function that spawns /bin/true through the installed taskman-gate
    (common.gate_starter), opens the gate and reaps it.

    Raises RuntimeError if the gate does not run /bin/true to exit 0 (a
    failing gate would be a cheaper, wrong floor).
    """
    start = common.gate_starter()

    def spawn() -> None:
        pid, gate_write = start()
        os.write(gate_write, b"\n")
        os.close(gate_write)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"taskman-gate ended /bin/true with wait status {status}")

    return spawn


def breakdown(workdir: str, count: int) -> dict:
    """bench/breakdown.py: the library's start path timed step by step, in-process."""
    state = os.path.join(workdir, "breakdown")
    proc = subprocess.run([sys.executable, os.path.join(common.BENCH_DIR, "breakdown.py"),
                           str(count), state], capture_output=True, text=True, timeout=300)
    shutil.rmtree(state, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"breakdown.py exited {proc.returncode}: {proc.stderr[-300:]}")
    return json.loads(lines[-1])


def section_sustained(bench) -> None:
    """4 client processes start /bin/true back to back; then the same clients
    against the ceiling's canned StartTask (the rate the transport allows)
    and against a ceiling whose StartTask spawns /bin/true through the
    sandbox gate before it answers (the rate a start allows on this machine
    with no taskman work at all: the floor of target 5)."""
    result = {}
    with CeilingServer(bench.workdir, name="ceiling-gate", gate=True) as gated:
        for name, server in (("taskman", bench.server), ("ceiling", bench.ceiling), ("gate_floor", gated)):
            result[name] = _sustained(bench, server.address, server.pid)
            bench.log(f"sustained {name}: {result[name]['per_second']:.0f} starts/s from 4 clients, "
                      f"p99 {fmt_ms(result[name]['latency']['p99'])}")
        failed = [line for line in gated.log().splitlines() if "wait status" in line]
    if failed:  # a gate that fails is cheaper than one that runs the task: a wrong floor
        raise RuntimeError(f"the gated ceiling's gates failed {len(failed)} times: {failed[0]}")
    bench.results["sustained"] = result


def _sustained(bench, address: str, pid: int, clients: int = 4) -> dict:
    seconds = bench.args.sustain_seconds
    workers = [bench.worker("starts", address, str(seconds)) for _ in range(clients)]
    for worker in workers:
        worker.receive(120)
    cpu_before = common.cpu_seconds(pid)
    began = time.perf_counter()
    for worker in workers:
        worker.send({"go": True})
    replies = [worker.receive(seconds + 120) for worker in workers]
    elapsed = time.perf_counter() - began
    cpu = common.cpu_seconds(pid) - cpu_before
    bench.close_workers()
    count = sum(reply["count"] for reply in replies)
    latencies = [value for reply in replies for value in reply["latencies"]]
    return {"clients": clients, "seconds": elapsed, "count": count, "per_second": count / elapsed,
            "latency": stats(latencies), "server_cpu_per_call": cpu / max(count, 1)}


def section_status(bench) -> None:
    """GetTaskStatus of a finished task, interleaved in blocks with the
    ceiling's canned GetTaskStatus, through the same client code."""
    task_id = bench.client.start(TRUE)
    bench.wait_ended(task_id, 30)
    calls = {"taskman": lambda: bench.client.status(task_id),
             "ceiling": lambda: bench.ceiling_client.status(task_id)}
    for call in calls.values():
        for _ in range(50):
            call()
    timed = {name: [] for name in calls}
    block = 50
    for _ in range(max(1, bench.args.status_samples // block)):
        for name, call in calls.items():
            for _ in range(block):
                began = time.perf_counter()
                call()
                timed[name].append(time.perf_counter() - began)
    bench.results["status"] = {name: stats(values) for name, values in timed.items()}
    bench.log(f"status: p50 {fmt_ms(median(timed['taskman']))}, bare unary "
              f"{fmt_ms(median(timed['ceiling']))}")
