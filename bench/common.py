"""Helpers shared by the bench scripts: statistics, processes, RSS, certificates.

Standard library only, so every bench process (the harness, the followers, the
transport-ceiling server) can import it before gevent patches anything.
"""

import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)

MiB = 1024 * 1024
GiB = 1024 * MiB


# -- statistics


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def stats(values: Sequence[float]) -> Dict[str, float]:
    """Count, p50, p99 and max of ``values`` (nan when empty)."""
    return {"n": len(values), "p50": median(values), "p99": percentile(values, 0.99),
            "max": max(values, default=float("nan"))}


# -- certificates


_generated = None


def certs_dir() -> str:
    """$TASKMAN_CERTS_DIR, else a PKI made once for this run (RSA 4096, as a
    server makes it) and set as $TASKMAN_CERTS_DIR, so that the servers and
    workers the bench starts use it too. Nothing is packaged any more."""
    global _generated
    explicit = os.environ.get("TASKMAN_CERTS_DIR")
    if explicit:
        return explicit
    if _generated is None:
        import atexit
        import shutil
        import tempfile

        from taskman import pki

        parent = tempfile.mkdtemp(prefix="taskman-bench-pki-")
        atexit.register(shutil.rmtree, parent, True)
        _generated = os.path.join(parent, "pki")
        pki.PKI.open(_generated)
        os.environ["TASKMAN_CERTS_DIR"] = _generated
    return _generated


def read_cert(name: str) -> bytes:
    with open(os.path.join(certs_dir(), name), "rb") as handle:
        return handle.read()


# -- processes


def free_port() -> int:
    """A loopback TCP port free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    """Return once 127.0.0.1:port accepts connections; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: Optional[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM ``proc`` (and its process group when it leads one), SIGKILL after ``grace``."""
    if proc is None or proc.poll() is not None:
        return
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    _signal(proc, signal.SIGKILL)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _signal(proc: subprocess.Popen, number: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, number)
        else:
            proc.send_signal(number)
    except ProcessLookupError:
        pass


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard if we may) to ``wanted``; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# The uid a bare gate start runs /bin/true as: any unprivileged uid costs the
# gate the same (it only changes to it).
NOBODY = 65534


def gate_starter(posix_spawn=os.posix_spawn):
    """A function that spawns /bin/true through the installed taskman-gate,
    confined as a sandboxed task is (uid NOBODY, private mounts, IPC and
    /proc, no capabilities) but with no cgroups, pipes or record, and holds
    it at its gate: it returns (pid, the gate's write end: write a byte to
    release it). The floors of a start (bench/latency.py, bench/ceiling.py
    --gate) both start it so."""
    from taskman.sandbox import Sandbox, check_gate

    check_gate()
    argv = Sandbox(uid=NOBODY, gid=NOBODY).gate_argv("/", "/bin/true", [])
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}

    def start():
        gate_read, gate_write = os.pipe2(os.O_CLOEXEC)
        if gate_read <= 3:  # dup2(3, 3) would keep close-on-exec set
            low, gate_read = gate_read, fcntl.fcntl(gate_read, fcntl.F_DUPFD_CLOEXEC, 4)
            os.close(low)
        try:
            pid = posix_spawn(argv[0], argv, environment, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                (os.POSIX_SPAWN_DUP2, gate_read, 3)])
        except BaseException:
            os.close(gate_write)
            raise
        finally:
            os.close(gate_read)
        return pid, gate_write

    return start


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.interval = interval
        self.samples: List[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self.samples.append(rss_bytes(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.samples.append(rss_bytes(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(rss_bytes(self.pid))

    @property
    def first(self) -> int:
        return self.samples[0] if self.samples else 0

    @property
    def peak(self) -> int:
        return max(self.samples) if self.samples else 0


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds used so far by ``pid`` (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return 0.0


# -- worker processes speaking JSON lines


class Worker:
    """A bench client process (bench/worker.py): send commands, read JSON replies."""

    def __init__(self, args: List[str], env: Optional[Dict[str, str]] = None):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(BENCH_DIR, "worker.py"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=env, start_new_session=True)

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        """The next JSON line, waiting at most ``timeout`` seconds."""
        result: Dict[str, object] = {}
        done = threading.Event()

        def read() -> None:
            line = self.proc.stdout.readline()
            result["line"] = line
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not done.wait(timeout):
            self.close()
            raise TimeoutError(f"worker {self.proc.args[2:]} gave no answer in {timeout}s")
        line = result["line"]
        if not line:
            code = self.proc.wait(5)
            raise RuntimeError(f"worker {self.proc.args[2:]} exited ({code}) without answering")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.proc.args[2:]}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_process(self.proc, grace=5)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def fmt_rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MiB:.0f} MiB/s"


def fmt_mib(size: float) -> str:
    if size >= 10 * GiB:
        return f"{size / GiB:.0f} GiB"
    if 0 < size < MiB:
        return f"{size / 1024:.0f} KiB"
    return f"{size / MiB:.0f} MiB"
