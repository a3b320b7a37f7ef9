#!/usr/bin/env python3
"""Fair sharing (#16): a quiet user's GetTaskStatus while another user floods.

    python bench/fairness.py [--rounds 6] [--phase-seconds 8] [--server PATH]

Starts a real taskman-server (default quotas and limits, its own temp
--state-dir and --cgroup-root, a free loopback port; needs root). client002
starts one task of its own and calls GetTaskStatus on it in a loop. Each
round (a fresh server) has a quiet phase (nothing else on the server), then a
flood phase, in which a separate process (this script with --flood, so the flooder's threads
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
# Six rounds of 8 s phases: about 6,000 calls a phase, so each pooled p99 is
# read from about 60 calls, not the 20-odd of three rounds (whose ratios went
# from 1.1x to 2.5x between runs on this machine).
ROUNDS = 6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="quiet+flood pairs; the p99s pool every round's calls")
    parser.add_argument("--phase-seconds", type=float, default=8.0,
                        help="seconds of timed calls in each phase")
    parser.add_argument("--pause", type=float, default=0.005,
                        help="seconds between the quiet user's calls")
    parser.add_argument("--server", default=None, help="taskman-server script to run")
    parser.add_argument("--flood-nice", type=int, default=19,
                        help="niceness of the flooding client process: its TLS and threads "
                             "share this host's CPUs with the server, which a remote "
                             "flooder's would not (0: compete as an equal)")
    parser.add_argument("--skip", default=[], type=lambda text: [x for x in text.split(",") if x],
                        help="kinds of flood left out, comma-separated: "
                             "output,bomb,streams,stops,huge (to find what costs)")
    parser.add_argument("--keep-logs", default=None, metavar="DIR",
                        help="copy each round's server log into DIR (to read the server's "
                             "own call times)")
    parser.add_argument("--server-option", action="append", default=[], metavar="OPTION",
                        help="one more taskman-server option (repeat; e.g. "
                             "--server-option=--cpu-period-us=100000)")
    parser.add_argument("--task-cpu-shares", type=int, default=0, metavar="N",
                        help="write N to the task root group's cpu.shares once the server "
                             "is up (hybrid cgroups; 0: leave it): does the flood's tasks' "
                             "CPU delay the server?")
    parser.add_argument("--record", action="store_true",
                        help="also write the verdict into docs/benchmarks.md "
                             "(bench/recorded.py)")
    parser.add_argument("--flood", default=None, metavar="ADDRESS",
                        help=argparse.SUPPRESS)  # the flooding child process
    return parser.parse_args(argv)


# -- the server


class Server:
    """taskman-server with default quotas, its own state dir and cgroup root."""

    def __init__(self, workdir: str, script: str, name: str, options=(), cpu_shares: int = 0):
        self.port = common.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "taskman-server.log")
        self.cgroup_root = f"taskman-fairness-{os.getpid()}-{name}"
        self.command = [sys.executable, script, "--server-address", self.address,
                        "--state-dir", os.path.join(workdir, "state"),
                        "--cgroup-root", self.cgroup_root,
                        "--stop-grace", "2", "--quota-output-bytes", OUTPUT_QUOTA, *options]
        self.cpu_shares = cpu_shares
        self.proc = None

    def __enter__(self) -> "Server":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            common.wait_for_port(self.port, 90, self.proc)
            if self.cpu_shares:
                self._write_cpu_shares()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _write_cpu_shares(self) -> None:
        """The cpu.shares of the group this server made for its tasks (hybrid
        layout), once it is there: the port may open before the driver's set-up."""
        path = f"/sys/fs/cgroup/cpu/{self.cgroup_root}/cpu.shares"
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the server made no {path}")
            time.sleep(0.05)
        with open(path, "w") as handle:
            handle.write(str(self.cpu_shares))

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


def flood(address: str, skip: List[str]) -> None:
    """Run every kind of flood (but ``skip``) as FLOOD_USER until stdin closes."""
    from taskman.client import ClientError, TaskmanClient

    client = TaskmanClient(address, FLOOD_USER, timeout=30)
    counts: Dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Event()

    def count(name: str) -> None:
        with lock:
            counts[name] = counts.get(name, 0) + 1

    def start(kind: str, command: str, *args: str):
        try:
            task = client.start(command, list(args))
            count(f"{kind} started")
            return task
        except ClientError as error:
            count(f"{kind} refused ({error.code.name})")
            return None

    writer = start("fast writer", PYTHON, "-c", FAST_WRITER)
    if "output" not in skip:
        start("output flood", PYTHON, "-c", FAST_WRITER)  # capped by the output quota
    if "bomb" not in skip:
        start("fork bomb", "/bin/sh", "-c", FORK_BOMB)
    trapping: List[str] = []
    for _ in range(STOP_THREADS * 2):
        task = start("TERM trap", "/bin/sh", "-c", TRAP_TERM)
        if task:
            trapping.append(task)
    while start("quota filler", "/bin/sleep", "600"):  # the rest of the running quota
        pass

    def stream() -> None:
        try:
            for _ in client.stream(writer):
                count("stream chunk")
                if done.is_set():
                    return
        except ClientError as error:
            count(f"stream ended ({error.code.name})")

    def stopper(index: int) -> None:
        while not done.is_set() and trapping:
            task = trapping[index % len(trapping)]
            try:
                client.stop(task, wait=0)
                count("stop sent")
            except ClientError as error:
                count(f"stop refused ({error.code.name})")
            index += 1

    def refill() -> None:
        while not done.is_set():
            task = start("TERM trap refill", "/bin/sh", "-c", TRAP_TERM)
            if task:
                trapping.append(task)
            else:
                time.sleep(0.05)

    def huge() -> None:
        while not done.is_set():
            start("huge argument", "/bin/echo", HUGE_ARGUMENT)

    threads = []
    if "streams" not in skip:
        threads += [threading.Thread(target=stream, daemon=True) for _ in range(33)]
    if "stops" not in skip:
        threads += [threading.Thread(target=stopper, args=(i,), daemon=True)
                    for i in range(STOP_THREADS)]
        threads.append(threading.Thread(target=refill, daemon=True))
    if "huge" not in skip:
        threads.append(threading.Thread(target=huge, daemon=True))
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


class Sched:
    """What the server got of the CPUs during a phase: its threads' CPU time
    and their time waiting to run (/proc/<pid>/task/*/schedstat; its main
    thread, the event loop, apart), the clients' CPU time, and the whole
    machine's busy time (/proc/stat): do the flood's tasks take CPU from
    the server, or is it the loop's own work that delays?"""

    def __init__(self, server: int, flooder: int = 0):
        self.server, self.flooder = server, flooder
        self.began = self._read()

    @staticmethod
    def _threads(pid: int):
        """(running, waiting) ns of the main thread and of all threads."""
        main = every = (0, 0)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return main, every
        for thread in threads:
            try:
                with open(f"/proc/{pid}/task/{thread}/schedstat") as handle:
                    ran, waited = (int(x) for x in handle.read().split()[:2])
            except (OSError, ValueError):
                continue  # the thread ended meanwhile
            every = (every[0] + ran, every[1] + waited)
            if thread == str(pid):
                main = (ran, waited)
        return main, every

    def _read(self):
        with open("/proc/stat") as handle:
            jiffies = [int(x) for x in handle.readline().split()[1:]]
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # less idle and iowait
        loop, server = self._threads(self.server)
        flooder = self._threads(self.flooder)[1] if self.flooder else (0, 0)
        me = self._threads(os.getpid())[1]
        return (time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), loop, server, flooder, me)

    def end(self) -> Dict[str, float]:
        """CPUs' worth (CPU seconds per second of the phase) of each."""
        began, ended = self.began, self._read()
        seconds = ended[0] - began[0]

        def per_second(index, part):
            return (ended[index][part] - began[index][part]) / 1e9 / seconds

        return {"machine_busy": (ended[1] - began[1]) / seconds,
                "loop_cpu": per_second(2, 0), "loop_wait": per_second(2, 1),
                "server_cpu": per_second(3, 0), "server_wait": per_second(3, 1),
                "flooder_cpu": per_second(4, 0), "quiet_client_cpu": per_second(5, 0)}


def _nice_session(pid: int, nice: int) -> None:
    try:
        with open(f"/proc/{pid}/autogroup", "w") as handle:
            handle.write(str(nice))
    except OSError:
        pass  # no autogroup scheduling here: the process's own nice value counts


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def one_round(args, workdir: str, script: str):
    """A quiet phase then a flood phase on one fresh server: (quiet, flooded, counts)."""
    from taskman.client import TaskmanClient

    os.makedirs(workdir)
    with Server(workdir, script, os.path.basename(workdir), args.server_option,
                args.task_cpu_shares) as server:
        try:
            with TaskmanClient(server.address, QUIET_USER) as client:
                own = client.start("/bin/sleep", "3600")
                timed_status(client, own, 1.0, args.pause)  # warm the channel
                sched = Sched(server.proc.pid)
                calm = timed_status(client, own, args.phase_seconds, args.pause)
                cpu = {"quiet": sched.end()}
                flooder = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--flood", server.address,
                     "--skip", ",".join(args.skip)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    start_new_session=True, preexec_fn=lambda: os.nice(args.flood_nice))
                try:
                    # With autogroup scheduling the CPU is shared between
                    # sessions first, and a nice value counts only inside one
                    # (docs/design.md): the flooder, a session of its own, is
                    # niced as a session too, or it takes as much as the server.
                    _nice_session(flooder.pid, args.flood_nice)
                    ready = flooder.stdout.readline()
                    if "flooding" not in ready:
                        raise RuntimeError(f"flooder did not start: {ready!r}")
                    sched = Sched(server.proc.pid, flooder.pid)
                    busy = timed_status(client, own, args.phase_seconds, args.pause)
                    cpu["flood"] = sched.end()
                    flooder.stdin.close()
                    counts = json.loads(flooder.stdout.readline() or "{}").get("counts", {})
                finally:
                    common.stop_process(flooder, grace=5)
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                shutil.copy(server.log_path, os.path.join(
                    args.keep_logs, f"server-{os.path.basename(workdir)}.log"))
    return calm, busy, counts, cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.flood:
        flood(args.flood, args.skip)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root (cgroups, tasks as unprivileged uids)")
    common.certs_dir()  # the server and the flooder inherit $TASKMAN_CERTS_DIR

    workdir = tempfile.mkdtemp(prefix="taskman-bench-fairness-")
    script = _script(args.server)
    quiet: List[float] = []
    flooded: List[float] = []
    rounds = []
    loads = [loadavg()]
    began = time.monotonic()
    try:
        for index in range(args.rounds):
            # A fresh server each round: the flood leaves client001 over its
            # output quota (finished logs stay on disk), refusing its next starts.
            calm, busy, counts, cpu = one_round(args, os.path.join(workdir, str(index)),
                                                script)
            loads.append(loadavg())
            quiet += calm
            flooded += busy
            rounds.append((calm, busy, counts, cpu))
            print(f"round {len(rounds)}: quiet p99 {percentile(calm, 0.99) * 1000:.2f} ms, "
                  f"flood p99 {percentile(busy, 0.99) * 1000:.2f} ms; flood: {counts}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(quiet, flooded, rounds, loads, time.monotonic() - began, args.flood_nice,
                  args.skip, [f"server options {' '.join(args.server_option)}"] * bool(args.server_option)
                  + [f"task cpu.shares {args.task_cpu_shares}"] * bool(args.task_cpu_shares))
    print(text)
    if args.record:
        record(args, quiet, flooded, text)
    return 0


def record(args, quiet, flooded, text) -> None:
    """The verdict rows and the run's table as docs/benchmarks.md's fairness block."""
    import recorded
    from targets import Row, at_most, format_ratio

    def row(what, fraction, goal):
        flood, calm = percentile(flooded, fraction), percentile(quiet, fraction)
        value = common.ratio(flood, calm)
        return Row("#16", what, f"{flood * 1000:.2f} ms", "the same calls, no flood",
                   f"{calm * 1000:.2f} ms", format_ratio(value), goal,
                   at_most(value, 2.0) if goal else None)

    rows = [row(f"{QUIET_USER}'s GetTaskStatus p99 while {FLOOD_USER} floods", 0.99, "≤ 2×"),
            row(f"{QUIET_USER}'s GetTaskStatus p50 while {FLOOD_USER} floods", 0.5, "")]
    words = [f"--rounds {args.rounds}", f"--phase-seconds {args.phase_seconds:g}"]
    words += [f"--skip {','.join(args.skip)}"] * bool(args.skip)
    words += [f"--server-option={option}" for option in args.server_option]
    words += [f"--task-cpu-shares {args.task_cpu_shares}"] * bool(args.task_cpu_shares)
    recorded.record("fairness", recorded.block(
        "fairness", "#16 Fair sharing: a quiet user's calls while another floods "
        "(bench/fairness.py)", "python bench/fairness.py " + " ".join(words) + " --record", rows,
        "\n\n".join(__doc__.split("\n\n")[2:5]) + "\n\nThe run's table:\n\n" + text))


def report(quiet, flooded, rounds, loads, elapsed, nice, skip, notes=()) -> str:
    def ms(values, fraction):
        return f"{percentile(values, fraction) * 1000:.2f} ms"

    ratio = common.ratio(percentile(flooded, 0.99), percentile(quiet, 0.99))
    by_round = [common.ratio(percentile(busy, 0.99), percentile(calm, 0.99))
                for calm, busy, _, _ in rounds]
    lines = [
        f"GetTaskStatus of {QUIET_USER} on its own task, {len(rounds)} interleaved quiet/flood "
        f"rounds, {elapsed:.0f} s, flooding client at nice {nice}"
        f"{', without ' + ','.join(skip) if skip else ''}"
        f"{''.join(', ' + note for note in notes)}; load average "
        f"(1/5/15 min, the flood's own fork bomb included) {' -> '.join(loads)}",
        "",
        "| phase | calls | p50 | p99 |",
        "|---|---|---|---|",
        f"| quiet (no flood) | {len(quiet)} | {ms(quiet, 0.5)} | {ms(quiet, 0.99)} |",
        f"| {FLOOD_USER} flooding | {len(flooded)} | {ms(flooded, 0.5)} | {ms(flooded, 0.99)} |",
        f"| **ratio flood/quiet** | | "
        f"{common.ratio(percentile(flooded, 0.5), percentile(quiet, 0.5)):.2f}x | "
        f"**{ratio:.2f}x** (target <= 2x: {'met' if ratio <= 2 else 'not met'}) |",
        "",
        f"Each phase's p99 pools its calls of every round: {tail(quiet)} (quiet) and "
        f"{tail(flooded)} (flooding) calls at or above it. The rounds' own p99 ratios: median "
        f"{percentile(by_round, 0.5):.2f}x, {min(by_round):.2f}x to {max(by_round):.2f}x "
        f"({sum(value <= 2 for value in by_round)} of {len(by_round)} at most 2x).",
        "",
    ]
    for index, (calm, busy, counts, cpu) in enumerate(rounds, 1):
        lines.append(f"- round {index}: p99 {ms(calm, 0.99)} quiet, {ms(busy, 0.99)} flooding "
                     f"({common.ratio(percentile(busy, 0.99), percentile(calm, 0.99)):.2f}x); "
                     f"flood calls: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
        lines.append("  CPUs' worth, quiet -> flood: " + "; ".join(
            f"{name.replace('_', ' ')} {cpu['quiet'][name]:.2f} -> {cpu['flood'][name]:.2f}"
            for name in cpu["flood"]) + f" (of {os.cpu_count()})")
    return "\n".join(lines)


def tail(values, fraction=0.99) -> int:
    """How many of ``values`` are at or above their ``percentile`` (its rank
    from the top): how many calls a p99 rests on."""
    return len(values) - min(len(values) - 1,
                             max(0, int(round(fraction * len(values) + 0.5)) - 1))


if __name__ == "__main__":
    sys.exit(main())
