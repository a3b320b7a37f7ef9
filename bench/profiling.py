"""Sampling profiles of the running server with py-spy, summarised as tables.

py-spy attaches to the server by pid (no change to the server, no restart)
and records collapsed stacks; ``summarize`` turns them into the functions
holding the most samples, inclusive (on the stack) and self (at the top).
Under gevent a sample is the stack of whichever greenlet is running, which is
what a hot path is.
"""

import collections
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

RATE = 200  # samples per second


def py_spy() -> Optional[str]:
    candidate = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("py-spy")


def record(pid: int, seconds: float, output: str, native: bool = False) -> subprocess.Popen:
    """Start recording ``pid`` for ``seconds`` into ``output`` (collapsed stacks)."""
    command = [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
               "--rate", str(RATE), "--format", "raw", "--output", output, "--nonblocking",
               "--threads"]
    if native:
        command.append("--native")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(recorder: subprocess.Popen, timeout: float) -> None:
    try:
        _, errors = recorder.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.communicate()
        raise RuntimeError("py-spy did not finish in time") from None
    if recorder.returncode != 0:
        raise RuntimeError(f"py-spy failed: {errors.strip()[-300:]}")


def _frame_name(frame: str) -> str:
    """'send_message (grpc/_server.py:123)' -> 'send_message (grpc/_server.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    path = path or where
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


IDLE_LOOP = "Hub.run (gevent/hub.py)"
# Frames under every RPC handler: on the stack of nearly every busy sample,
# they would fill the inclusive table and say nothing.
WRAPPERS = {"Thread._bootstrap (threading.py)", "Thread._bootstrap_inner (threading.py)",
            "Thread.run (threading.py)", "_worker (concurrent/futures/thread.py)",
            "_WorkItem.run (concurrent/futures/thread.py)"}


def summarize(raw_path: str, main_thread: int, top: int = 12) -> Dict[str, object]:
    """Summarise the samples of the server's main thread (all its greenlets).

    Returns the main thread's sample count, how many of those found the hub
    in its loop with no greenlet running (waiting for events, or in C), and
    the ``top`` functions by inclusive and by self samples among the rest.
    Other threads are gevent's native pool, where gRPC blocks polling its
    completion queue: they are counted, not ranked.
    """
    inclusive: Dict[str, int] = collections.Counter()
    self_time: Dict[str, int] = collections.Counter()
    main = busy = other = 0
    with open(raw_path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            stack, _, count_text = line.rpartition(" ")
            try:
                count = int(count_text)
            except ValueError:
                continue
            frames = stack.split(";")
            thread = frames[0]
            if thread.startswith("thread ("):
                frames = frames[1:]
                if thread != f"thread ({main_thread})":
                    other += count
                    continue
            main += count
            frames = [_frame_name(frame) for frame in frames if frame]
            if not frames or frames == [IDLE_LOOP]:
                continue
            busy += count
            for name in set(frames) - WRAPPERS:
                inclusive[name] += count
            self_time[frames[-1]] += count
    return {"samples": main, "busy": busy, "other_threads": other,
            "inclusive": inclusive.most_common(top),
            "self": self_time.most_common(top)}


def table(summary: Dict[str, object], key: str, top: int = 12) -> List[str]:
    """Markdown rows 'share of busy samples | samples | function' for ``key``."""
    total = summary["busy"] or 1
    rows = ["| share | samples | function |", "|---:|---:|---|"]
    for name, count in summary[key][:top]:
        rows.append(f"| {100 * count / total:.1f}% | {count} | `{name}` |")
    return rows


def section_profile(bench) -> None:
    """py-spy on the running server: StartTask in a loop, then one follower
    replaying a finished task in a loop."""
    import common
    from harness import follow

    if not py_spy():
        bench.notes.append("py-spy not installed: no profiles.")
        return
    seconds = bench.args.profile_seconds
    server = bench.server
    result = {}
    raw = os.path.join(bench.workdir, "profile-start.txt")
    recorder = record(server.pid, seconds, raw)
    time.sleep(0.5)  # py-spy attaches
    cpu_before = common.cpu_seconds(server.pid)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        bench.client.start("/bin/true")
        count += 1
    cpu = common.cpu_seconds(server.pid) - cpu_before
    finish(recorder, seconds + 60)
    result["start"] = {**summarize(raw, server.pid), "calls": count, "cpu_per_call": cpu / max(count, 1)}
    size = bench.args.stream_bytes
    task_id = bench.client.start("head", ["-c", str(size), "/dev/zero"])
    bench.wait_ended(task_id, 120)
    follower = bench.worker("follow", server.address, "1")
    follower.receive(60)
    raw = os.path.join(bench.workdir, "profile-stream.txt")
    recorder = record(server.pid, seconds, raw)
    time.sleep(0.5)
    streamed, cpu_before, began = 0, common.cpu_seconds(server.pid), time.perf_counter()
    while time.perf_counter() - began < seconds:
        streamed += follow(follower, task_id, size)["bytes"]
    cpu = common.cpu_seconds(server.pid) - cpu_before
    finish(recorder, seconds + 60)
    bench.close_workers()
    server.discard_output(task_id)
    result["stream"] = {**summarize(raw, server.pid), "bytes": streamed,
                        "cpu_per_gib": cpu / max(streamed, 1) * common.GiB}
    bench.results["profile"] = result
    bench.log("profiles recorded")
