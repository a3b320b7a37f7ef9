"""Reload in place under load: time from SIGHUP to the first answered call,
the window in which calls were refused, and the longest pause a follower saw.

Starts a taskman-server on a free loopback port with --tasks running tasks
(``--counters`` of them write a counter every millisecond, the rest sleep)
and --followers ``taskman stream`` processes on the counters, then sends
SIGHUP --reloads times. A probe (a process in a session of its own) calls GetTaskStatus every 10 ms;
each follower's lines are timestamped as they arrive and checked to be the
counter with no gap and no repeat.

    python bench/reload.py --tasks 1000 --followers 20 [--record]

The cgroup driver defaults to none (``--driver hybrid`` or ``v2`` for the
real thing: their start-up clean-up spares adopted tasks' groups), so the
numbers compare across hosts. The printed log directory holds the server's log.

"First answer" is the strict measure: the first probe call answered by the
new image (the first success after the first refusal), although the old
image answers every call during the new image's ``--check``. The refused
window and the followers' longest pause are reported beside it. A
follower's longest pause counts from 1 s before the first SIGHUP to the
end, between reloads too; before that the bench is still starting its own
followers and probe on the same CPUs, and the whole run's is reported
beside it.

The taskman package the server imports is compiled to bytecode first, as
pip does when it installs it: with PYTHONDONTWRITEBYTECODE (tox and the dev
shells set it) a source tree is otherwise compiled again by every image
and every ``--check``, which a deployed server never does. ``--source``
measures that case.
"""

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import certs_dir, fmt_ms, free_port, percentile  # noqa: E402

COUNTER = ("import time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n"
           "    time.sleep(0.001)\n")
SLOW = "exec sleep 3600"
# The followers' longest pause is counted from this long before the first
# SIGHUP: before that, 20 follower processes and the probe start on the
# bench's 2 CPUs (pauses of up to 1.2 s before any reload, 2026-12-03).
SETTLED = 1.0  # seconds
BIN = os.path.dirname(sys.executable)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--counters", type=int, default=4)
    parser.add_argument("--followers", type=int, default=16)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--driver", default="none")
    parser.add_argument("--follower-sessions", action="store_true",
                        help="each follower in a session of its own (see Follower)")
    parser.add_argument("--probe", nargs=2, metavar=("ADDRESS", "TASK_ID"),
                        help=argparse.SUPPRESS)  # the probe's own process (Probe)
    parser.add_argument("--source", action="store_true",
                        help="do not compile the taskman package to bytecode first")
    parser.add_argument("--record", action="store_true",
                        help="also write the rows into docs/benchmarks.md (bench/recorded.py)")
    options = parser.parse_args()
    if options.probe:
        return run_probe(*options.probe)
    if not options.source:
        print(f"bytecode: {compile_package()} compiled (as pip does at install)", flush=True)

    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    certs = certs_dir()
    from taskman.client import ClientError

    port = free_port()
    address = f"127.0.0.1:{port}"
    workdir = tempfile.mkdtemp(prefix="taskman-bench-reload-")
    log_path = os.path.join(workdir, "server.log")
    print(f"server log: {log_path}", flush=True)
    env = dict(os.environ, TASKMAN_CERTS_DIR=certs)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [os.path.join(BIN, "taskman-server"), "--server-address", address,
             "--state-dir", os.path.join(workdir, "state"), "--cgroup-driver", options.driver,
             "--cgroup-root", f"taskman-bench-{os.getpid()}", "--quota-running-tasks", "0",
             "--quota-open-streams", "0", "--quota-calls-in-flight", "0", "--stop-grace", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = probe_client(address, certs)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list(limit=1)
                break
            except ClientError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start; see {log_path}") from None
                time.sleep(0.1)
        started = time.monotonic()
        counters = [client.start("/usr/bin/python3", ["-c", COUNTER])
                    for _ in range(options.counters)]
        others = [client.start("sh", ["-c", SLOW])
                  for _ in range(max(options.tasks - options.counters, 0))]
        print(f"{len(counters) + len(others)} tasks started in "
              f"{time.monotonic() - started:.1f}s", flush=True)
        followers = [Follower(address, counters[index % len(counters)], env,
                              own_session=options.follower_sessions,
                              notes=os.path.join(workdir, f"follower{index}.err"))
                     for index in range(options.followers)]
        for follower in followers:
            follower.connected.wait(60)
        probe = Probe(address, counters[0], env)
        probe.start()
        results = []
        signals = []
        for _ in range(options.reloads):
            time.sleep(2)
            sent = time.monotonic()
            signals.append(sent)
            server.send_signal(signal.SIGHUP)
            answered = probe.first_answer_after(sent, timeout=20)
            if answered is None:  # no call was refused: see Probe.first_call_of_the_new_image
                answered = probe.first_call_of_the_new_image(sent, log_path, len(results))
            refused = probe.refused_window(sent)
            results.append((answered - sent, refused))
            print(f"SIGHUP -> first answered call {fmt_ms(answered - sent)}; calls refused "
                  f"for {fmt_ms(refused)}", flush=True)
        time.sleep(2)
        signals.append(time.monotonic())  # the end of the last reload's window
        probe.stop()
        reload_gaps = []  # per reload, the longest gap any follower saw in its window
        for number, (sent, until) in enumerate(zip(signals, signals[1:], strict=False), 1):
            gaps = sorted(follower.gap_after(sent, until) for follower in followers)
            reload_gaps.append(max(g[1] - g[0] for g in gaps))
            print(f"reload {number}: the followers' longest gap after SIGHUP, from their last "
                  f"line before it to the first after (s after SIGHUP): last "
                  f"{percentile([g[0] for g in gaps], 0.5):.2f} p50, first "
                  f"{percentile([g[1] for g in gaps], 0.5):.2f} p50 / "
                  f"{max(g[1] for g in gaps):.2f} max; the gap itself "
                  f"{percentile([g[1] - g[0] for g in gaps], 0.5):.2f} p50 / "
                  f"{max(g[1] - g[0] for g in gaps):.2f} max")
        client.close()  # idle through the reloads: a fresh channel, not grpc's backoff
        for task_id in counters + others:
            stop_retrying(client, task_id)
        # The reloads' span: from SETTLED before the first SIGHUP (the 20
        # followers' and the probe's own start-up on 2 CPUs is over) to the end.
        since = signals[0] - SETTLED
        pauses, whole_run = [], []
        for follower in followers:
            follower.process.wait(60)
            pauses.append(follower.longest_pause(since))
            whole_run.append(follower.longest_pause())
            follower.check()
        print(f"followers: {len(followers)}, every one saw the counter with no gap and no "
              f"repeat; longest pause p50 {fmt_ms(percentile(pauses, 0.5))}, "
              f"max {fmt_ms(max(pauses))} (over the whole run, the bench's start-up included: "
              f"max {fmt_ms(max(whole_run))})")
        print(f"where the followers' longest pauses began: {where_paused(followers, signals[:-1])}")
        for check, stopped in phases(log_path):
            print(f"from the server's log: --check and the pause {fmt_ms(check)}, "
                  f"stop of the old image to the new one listening {fmt_ms(stopped)}")
        for line in timelines(log_path):
            print(f"from the server's log: {line}")
        checks = check_times(log_path)
        if checks:
            print(f"from the server's log: --check alone {' / '.join(fmt_ms(c) for c in checks)}")
        strict = [answered for answered, _ in results]
        print(f"summary ({options.tasks} tasks, {options.reloads} reloads, "
              f"{len(followers)} followers):")
        print(f"  SIGHUP -> first answer by the new image: "
              f"{' / '.join(fmt_ms(value) for value in strict)}; max {fmt_ms(max(strict))} "
              f"(target under 1 s: {'met' if max(strict) < 1.0 else 'not met'})")
        print(f"  calls refused: {' / '.join(fmt_ms(refused) for _, refused in results)}")
        print(f"  follower longest pause: p50 {fmt_ms(percentile(pauses, 0.5))}, "
              f"max {fmt_ms(max(pauses))}")
        if options.record:
            record(options, results, pauses, whole_run, checks, reload_gaps)
        return 0
    finally:
        client.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


def record(options, results, pauses, whole_run, checks, reload_gaps) -> None:
    """The rows as docs/benchmarks.md's reload block (bench/recorded.py)."""
    import recorded
    from targets import Row

    def seconds(values):
        return " / ".join(f"{value:.2f}" for value in values) + " s"

    strict = [answered for answered, _ in results]
    refused = [window for _, window in results]
    rows = [
        Row("#19", f"SIGHUP to the first call answered by the new image, {options.tasks} "
            f"running tasks, each of {options.reloads} reloads", seconds(strict),
            "calls refused (old image stopped, new one not yet answering)", seconds(refused),
            "", "< 1 s", max(strict) < 1.0),
        Row("#19", f"longest pause seen by a follower ({len(pauses)} followers, every byte "
            f"exactly once; from {SETTLED:g} s before the first SIGHUP to the end)",
            f"max {max(pauses):.2f} s", "the followers' p50",
            f"{percentile(pauses, 0.5):.2f} s", "", "< 1 s", max(pauses) < 1.0),
    ]
    # Beside the target, for reading: the row above counts the reloads'
    # whole span, between reloads too, where the followers and the counters
    # saturate the 2 CPUs on their own; the whole run adds the bench's own
    # start-up before it.
    rows.append(Row("#19", "longest gap in a reload's window (0.5 s before its SIGHUP to the "
                    "next), any follower", seconds(reload_gaps), "", "", "", "", None))
    rows.append(Row("#19", "longest pause seen by a follower over the whole run, the bench's "
                    "start-up of its followers and probe included", f"max {max(whole_run):.2f} s",
                    "", "", "", "", None))
    if checks:
        rows.append(Row("#19", "the new image's --check (while the old image serves)",
                        seconds(checks), "", "", "", "", None))
    command = (f"python bench/reload.py --tasks {options.tasks} --counters {options.counters} "
               f"--followers {options.followers} --reloads {options.reloads} --record")
    recorded.record("reload", recorded.block(
        "reload", "#19 Reload in place: SIGHUP to the first answer, followers' pause "
        "(bench/reload.py)", command, rows, __doc__.split("\n\n", 1)[1].strip()))


def where_paused(followers, signals) -> str:
    """The five longest of the followers' longest pauses, each as its length
    and when it began: after which SIGHUP (and how long after; up to 0.5 s
    before one counts as that reload's, negative), or before the first.
    A pause far from every SIGHUP is not the reload's own."""
    pauses = []
    for follower in followers:
        gaps = list(zip(follower.times, follower.times[1:], strict=False))
        if gaps:
            start, end = max(gaps, key=lambda gap: gap[1] - gap[0])
            before = [number for number, sent in enumerate(signals, 1) if sent <= start + 0.5]
            where = (f"reload {before[-1]} {start - signals[before[-1] - 1]:+.2f} s" if before
                     else "before the first reload")
            pauses.append((end - start, where))
    return "; ".join(f"{length:.2f} s at {where}" for length, where in sorted(pauses)[::-1][:5])


def stop_retrying(client, task_id: str, attempts: int = 20) -> None:
    """Stop ``task_id``; a loaded server may fail a fresh connection's
    handshake (seen at load ~40), so each failure gets a fresh one."""
    from taskman.client import ClientError

    for attempt in range(attempts):
        try:
            client.stop(task_id, wait=0)
            return
        except ClientError:
            if attempt == attempts - 1:
                raise
            client.close()
            time.sleep(0.5)


def compile_package() -> str:
    """Compile the taskman package this process imports (the one the
    server and the CLI run: same PYTHONPATH); return its directory."""
    import compileall

    import taskman

    directory = os.path.dirname(os.path.abspath(taskman.__file__))
    if not compileall.compile_dir(directory, quiet=1):
        raise SystemExit(f"cannot compile {directory}")
    return directory


def phases(log_path: str):
    """Per reload, from the server's log lines: (SIGHUP to the reload going on,
    that to the new image listening), in seconds."""
    marks = {"SIGHUP: checking": "sighup", "reloading into": "stop", "listening on": "listening"}
    times = {}
    with open(log_path, errors="replace") as log:
        for line in log:
            for text, name in marks.items():
                if text in line:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    times.setdefault(name, []).append(stamp.timestamp())
    listening = times.get("listening", [])[1:]  # the first is the start
    return [(stop - sighup, up - stop) for sighup, stop, up
            in zip(times.get("sighup", []), times.get("stop", []), listening, strict=False)]


def timelines(log_path: str):
    """The new images' timeline lines (taskman.reload_timeline) and when
    their adopted tasks were all supervised again."""
    with open(log_path, errors="replace") as log:
        return [line.split(": ", 1)[1].strip() for line in log
                if "reload timeline" in line or "supervised again" in line]


def check_times(log_path: str):
    """Per reload, the ``--check`` alone, in seconds, as the server logs it."""
    with open(log_path, errors="replace") as log:
        return [float(found.group(1)) for line in log
                if (found := re.search(r"--check passed in ([0-9.]+)s", line))]


class Follower:
    """``taskman stream`` on a task; every line's arrival time is kept.

    With autogroup scheduling a session shares the CPU as one: in the
    bench's session (the default, as in every run recorded before
    2026-12-02 06:30) 20 followers leave the probe a 21st of its share; in
    sessions of their own (``own_session``, --follower-sessions) they take a
    share each from the server."""

    def __init__(self, address: str, task_id: str, env: dict, own_session: bool = False,
                 notes: str = os.devnull):
        with open(notes, "wb") as errors:  # its reconnection notes
            self.process = subprocess.Popen(
                [os.path.join(BIN, "taskman"), "stream", task_id, "--user-id", "client001",
                 "--server-address", address], stdout=subprocess.PIPE, stderr=errors,
                env=env, start_new_session=own_session)
        self.lines = []
        self.times = []
        self.connected = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line)
            self.connected.set()

    def longest_pause(self, since: float = 0.0) -> float:
        """The longest gap between two lines that ends after ``since`` (a gap
        under way at ``since`` counts whole)."""
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False) if b > since),
                   default=0.0)

    def gap_after(self, sent: float, until: float):
        """The longest gap between lines from ``sent`` to ``until``: (its start,
        its end), in seconds after ``sent``."""
        times = [at for at in self.times if sent - 0.5 <= at <= until]
        start, end = max(zip(times, times[1:], strict=False), key=lambda gap: gap[1] - gap[0],
                         default=(sent, sent))
        return start - sent, end - sent

    def check(self) -> None:
        numbers = [int(line) for line in self.lines]
        if numbers != list(range(len(numbers))):
            raise SystemExit("a follower saw a gap or a repeat")


def probe_client(address: str, certs: str):
    """A client for the probe. grpcio's default reconnect backoff (1 s,
    growing) would be measured instead of the server's own outage: the
    probe reconnects every 100-200 ms."""
    from taskman.client import TaskmanClient

    return TaskmanClient(address, "client001", certs_dir=certs, timeout=5, options=[
        ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 200)])


def run_probe(address: str, task_id: str) -> int:
    """``--probe``: GetTaskStatus every 10 ms, one line per attempt on stdout
    (started, ended: time.monotonic(), the same clock in every process;
    answered 1 or 0), until stdin closes. After a failed attempt the next
    one connects afresh, so the first answer is the server's, not a
    reconnect backoff's."""
    client = probe_client(address, os.environ["TASKMAN_CERTS_DIR"])
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        at = time.monotonic()
        try:
            client.status(task_id)
            answered = 1
        except Exception:  # noqa: BLE001 - any failure is a refused call here
            answered = 0
            # The next attempt on a fresh channel, as ``taskman stream`` does
            # during a reload: the old one would wait out grpc's backoff.
            client.close()
        print(f"{at} {time.monotonic()} {answered}", flush=True)
        time.sleep(0.01)


class Probe(threading.Thread):
    """GetTaskStatus every 10 ms: (started, ended, answered) for each attempt.

    The calls are made by a process in a session of its own (``run_probe``):
    with autogroup scheduling the bench's session, where the followers run,
    shares one slice of the CPU, and a probe thread in it measured its own
    wait for the CPU (one reload's first answer came 2.4 s after the new
    image listened, with calls refused for 0.3 s)."""

    def __init__(self, address: str, task_id: str, env: dict):
        super().__init__(daemon=True)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--probe", address, task_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
            start_new_session=True)
        self.attempts = []

    def run(self) -> None:
        for line in self.process.stdout:
            at, ended, answered = line.split()
            self.attempts.append((float(at), float(ended), answered == "1"))

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(10)
        self.join(10)

    def first_answer_after(self, sent: float, timeout: float) -> float:
        """When the first call that started after a refusal following ``sent``
        was answered; None if no call was refused within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [attempt for attempt in list(self.attempts) if attempt[0] >= sent]
            failed = [index for index, attempt in enumerate(after) if not attempt[2]]
            if failed and any(attempt[2] for attempt in after[failed[0]:]):
                return next(attempt[1] for attempt in after[failed[0]:] if attempt[2])
            time.sleep(0.05)
        return None

    def first_call_of_the_new_image(self, sent: float, log_path: str, earlier: int) -> float:
        """When the first call made after the exec was answered: for a
        reload in which no call was refused (the probe's call in flight
        through the outage, seen at load ~25). The exec's time comes from
        the new image's timeline line (taskman.reload_timeline), as seconds
        after its SIGHUP mark, which is a little after ``sent``."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(log_path, errors="replace") as log:
                lines = [line for line in log if "reload timeline" in line]
            if len(lines) > earlier:
                found = re.search(r"exec ([0-9.]+)", lines[earlier])
                if found is None:
                    break
                execed = sent + float(found.group(1))
                for started, ended, answered in list(self.attempts):
                    if started >= execed and answered:
                        return ended
            time.sleep(0.05)
        raise SystemExit("no answer after the reload")

    def refused_window(self, sent: float) -> float:
        failed = [attempt for attempt in self.attempts if attempt[0] >= sent and not attempt[2]]
        return failed[-1][1] - failed[0][0] if failed else 0.0


if __name__ == "__main__":
    sys.exit(main())
