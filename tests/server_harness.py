"""Run the real taskman-server and taskman CLI as subprocesses, every wait bounded.

The programs are the installed ones (found on PATH, as tox installs them);
only when they are not installed does this fall back to ``python bin/...``
with the checkout on PYTHONPATH.

Certificates: one real PKI (RSA 4096, as a server makes it) is generated per
run by ``session_pki`` and named by TASKMAN_CERTS_DIR in this process's
environment, so the CLI, raw gRPC clients and ``tls.client_files`` use its
bundles. Each server gets a copy of it as its own generated PKI
(<state-dir>/pki), so servers run as they do by default: reloading,
revocations, ``taskman-server pki``; only the first-start tests make one.
"""

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from support import poll_for, task_visible_tempdir
from taskman import pki as pki_module
from taskman.defaults import CERTS_DIR_VARIABLE

REPO = Path(__file__).resolve().parents[1]
# The contract: the design document kept in docs/.
RFD = REPO / "docs" / "RFD.md"
DRIVER = os.environ.get("TASKMAN_TEST_CGROUP_DRIVER", "auto")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
CLI_TIMEOUT = 60.0

_roots = itertools.count()
_session_pki: Optional[Path] = None


def session_pki() -> Path:
    """This run's PKI (made on first call, about 7 s for five RSA-4096 keys),
    also set as TASKMAN_CERTS_DIR in this process's environment."""
    global _session_pki
    if _session_pki is None:
        parent = Path(tempfile.mkdtemp(prefix="taskman-test-pki-"))
        atexit.register(shutil.rmtree, parent, True)
        pki_module.PKI.open(str(parent / "pki"))
        _session_pki = parent / "pki"
        os.environ[CERTS_DIR_VARIABLE] = str(_session_pki)
    return _session_pki


def task_readable_dir() -> Path:
    """A new directory tasks can read (mode 0755 all the way down), removed at
    exit. Tasks run as unprivileged uids with a private /tmp: fixtures they
    read cannot live in pytest's tmp_path."""
    path = Path(task_visible_tempdir("fixtures-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def program(name: str) -> List[str]:
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, str(REPO / "bin" / name)]


def program_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    if not shutil.which("taskman-server"):
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


class Server:
    """A taskman-server on a kernel-chosen loopback port, with its own state
    directory and cgroup root; ``stop()`` sends SIGTERM and returns the exit status."""

    def __init__(self, workdir: Path, *options: str, env: Optional[dict] = None,
                 copy_pki: bool = True, address: str = "127.0.0.1:0"):
        """``copy_pki``: start with a copy of the session PKI in
        <state-dir>/pki (False: the server makes its own, or uses ``options``).
        TASKMAN_CERTS_DIR reaches the server only when ``env`` sets it."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "state"
        self.copy_pki = copy_pki
        self.log_path = self.workdir / "server.log"
        self.command = [*program("taskman-server"), "--server-address", address,
                        "--state-dir", str(self.state_dir), "--cgroup-driver", DRIVER,
                        "--cgroup-root", f"taskman-it-{os.getpid()}-{next(_roots)}",
                        "--stop-grace", "2", *options]
        self.env = program_env(env)
        if CERTS_DIR_VARIABLE not in (env or {}):
            self.env.pop(CERTS_DIR_VARIABLE, None)
        self.process: Optional[subprocess.Popen] = None
        self.port = 0
        self.address = ""

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    def start(self) -> "Server":
        if self.copy_pki and not self.pki_dir.exists():
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copytree(session_pki(), self.pki_dir, copy_function=shutil.copy2)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
                self.address = f"127.0.0.1:{self.port}"
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"taskman-server exited with {self.process.returncode} "
                                     f"before listening:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"taskman-server not listening after {START_TIMEOUT}s:\n"
                                     f"{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        """SIGTERM, then wait (bounded) for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"taskman-server ignored SIGTERM for {STOP_TIMEOUT}s:\n"
                                 f"{self.log()}") from None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def started_servers(workdir: Path, kind=None):
    """A fixture body: yields ``start(*options, **kwargs)`` that starts a
    ``kind`` (default Server) in its own directory; afterwards every server
    still running is stopped with SIGTERM and must exit 0."""
    kind = kind or Server
    started = []

    def start(*options, **kwargs):
        instance = kind(Path(workdir) / f"server{len(started)}", *options, **kwargs)
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        if instance.process and instance.process.poll() is None:
            status = instance.stop()
            assert status == 0, f"taskman-server exited with {status}:\n{instance.log()}"


def taskman(*args: str, timeout: float = CLI_TIMEOUT, env: Optional[dict] = None,
            **popen) -> subprocess.CompletedProcess:
    """Run the taskman CLI; stdout/stderr are bytes."""
    return subprocess.run([*program("taskman"), *args], capture_output=True, timeout=timeout,
                          env=program_env(env), **popen)


class Cli:
    """The CLI bound to one server: ``cli.start("client001", "sh", "-c", ...)``."""

    def __init__(self, server: Server):
        self.server = server

    def run(self, command: str, *args: str, user: str = "client001",
            **kwargs) -> subprocess.CompletedProcess:
        return taskman(command, *args, "--user-id", user, "--server-address",
                       self.server.address, **kwargs)

    def start(self, user: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return taskman("start", "--user-id", user, "--server-address", self.server.address,
                       "--", *command, **kwargs)

    def follow(self, task_id: str, user: str = "client001",
               stderr=subprocess.PIPE) -> subprocess.Popen:
        """``taskman stream`` as a running process, its output on a pipe."""
        return subprocess.Popen([*program("taskman"), "stream", task_id, "--user-id", user,
                                 "--server-address", self.server.address],
                                stdout=subprocess.PIPE, stderr=stderr, env=program_env())

    def start_id(self, user: str, *command: str) -> str:
        result = self.start(user, *command)
        assert result.returncode == 0, result.stderr
        return result.stdout.decode().split()[-1]

    def status_row(self, task_id: str, user: str = "client001") -> dict:
        """get-status's table as {column: cell}, checked to be well formed."""
        result = self.run("get-status", task_id, user=user)
        assert result.returncode == 0, result.stderr
        return parse_status_table(result.stdout.decode())

    def wait_ended(self, task_id: str, user: str = "client001", timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            row = self.status_row(task_id, user)
            if row["STATUS"] != "JOB_STATUS_STARTED":
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still running after {timeout}s")
            time.sleep(0.1)


STATUS_COLUMNS = ["TASK ID", "START TIME", "PID", "STATUS", "EXIT CODE", "SIGNAL", "SOURCE",
                  "END TIME"]


def parse_status_table(text: str) -> dict:
    """Split get-status output by the header's column positions."""
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == 3, text
    header, rule, row = lines
    starts = [header.index(name) for name in STATUS_COLUMNS]
    assert starts == sorted(starts), header
    for name, start in zip(STATUS_COLUMNS, starts, strict=True):
        assert rule[start:start + len(name)] == "-" * len(name), rule
    bounds = list(zip(starts, starts[1:] + [None], strict=True))
    return {name: row[start:end].strip()
            for name, (start, end) in zip(STATUS_COLUMNS, bounds, strict=True)}


def wait_for(predicate, timeout: float = 10.0, message: str = "condition", interval=0.05):
    return poll_for(predicate, timeout, message, interval)
