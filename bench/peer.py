"""supervisord, the peer users would run instead, driven the way they would.

A private supervisord (its own config, unix socket, logs, all in a temp
directory) with two preconfigured programs: ``true`` (/bin/true) for start
latency and ``writer`` (a fast writer of N bytes) for ``tail -f``. Measured:
  - startProcess over its XML-RPC API (the counterpart of StartTask through
    the client library), and ``supervisorctl start`` (the counterpart of
    ``taskman start``), each between restarts of the exited program;
  - ``supervisorctl tail -f writer`` throughput (the counterpart of
    ``taskman stream``) over a bounded window, and the writer's own pace
    with and without that follower.
"""

import http.client
import os
import subprocess
import sys
import threading
import time
import xmlrpc.client
from typing import List, Optional, Tuple

import common

CONFIG = """\
[unix_http_server]
file={dir}/supervisor.sock

[supervisord]
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}
nodaemon=true
loglevel=warn

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{dir}/supervisor.sock

[program:true]
command=/bin/true
autostart=false
autorestart=false
startsecs=0
startretries=0
stdout_logfile={dir}/true.log

[program:writer]
command={writer}
autostart=false
autorestart=false
startsecs=0
startretries=0
redirect_stderr=true
stdout_logfile={dir}/writer.log
stdout_logfile_maxbytes=0
"""

STOPPED_STATES = {"STOPPED", "EXITED", "FATAL", "BACKOFF"}


def _tool(name: str) -> str:
    """supervisord/supervisorctl from the bench's own environment."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(candidate):
        raise RuntimeError(f"{name} not found beside {sys.executable}: "
                           "pip install -r bench/requirements.txt")
    return candidate


class Supervisord:
    def __init__(self, directory: str, writer_command: str):
        self.dir = directory
        self.config = os.path.join(directory, "supervisord.conf")
        with open(self.config, "w") as handle:
            handle.write(CONFIG.format(dir=directory, writer=writer_command))
        self.proc: Optional[subprocess.Popen] = None
        self.rpc = None

    def __enter__(self) -> "Supervisord":
        self.proc = subprocess.Popen([_tool("supervisord"), "-c", self.config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                # A fresh transport each try: one whose request failed stays unusable.
                self.rpc = self._proxy()
                try:
                    if self.rpc.supervisor.getState()["statename"] == "RUNNING":
                        break
                except (OSError, xmlrpc.client.Error, http.client.HTTPException):
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"supervisord did not come up (see {self.dir})")
                time.sleep(0.05)
        except BaseException:
            common.stop_process(self.proc)
            raise
        return self

    def _proxy(self):
        from supervisor.xmlrpc import SupervisorTransport
        transport = SupervisorTransport(None, None, f"unix://{self.dir}/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def __exit__(self, *exc) -> None:
        try:
            self.rpc.supervisor.stopAllProcesses(True)
        except Exception:  # best effort: it is killed next anyway
            pass
        common.stop_process(self.proc, grace=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self, name: str) -> str:
        return self.rpc.supervisor.getProcessInfo(name)["statename"]

    def wait_stopped(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state(name) not in STOPPED_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisord program {name} still running after {timeout}s")
            time.sleep(0.001)

    def ctl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("supervisorctl"), "-c", self.config, *args],
                              capture_output=True, text=True, timeout=60, **kwargs)

    # -- measurements

    def api_start_latencies(self, count: int) -> Tuple[List[float], int]:
        """startProcess('true', wait=True) over XML-RPC, the program exited in between.

        Returns the latencies and how many starts supervisord answered with
        ABNORMAL_TERMINATION: /bin/true can exit before supervisord marks it
        RUNNING; it was started all the same, so the latency counts.
        """
        latencies = []
        abnormal = 0
        for _ in range(count):
            self.wait_stopped("true")
            began = time.perf_counter()
            try:
                self.rpc.supervisor.startProcess("true", True)
            except xmlrpc.client.Fault as fault:
                if "ABNORMAL_TERMINATION" not in fault.faultString:
                    raise
                abnormal += 1
            latencies.append(time.perf_counter() - began)
        self.wait_stopped("true")
        return latencies, abnormal

    def ctl_start_latencies(self, count: int) -> List[float]:
        """`supervisorctl start true` as a user types it: interpreter start included."""
        latencies = []
        for _ in range(count):
            self.wait_stopped("true")
            began = time.perf_counter()
            result = self.ctl("start", "true")
            latencies.append(time.perf_counter() - began)
            if "started" not in result.stdout and "ABNORMAL" not in result.stdout:
                raise RuntimeError(f"supervisorctl start: {result.stdout} {result.stderr}")
        self.wait_stopped("true")
        return latencies

    def writer_alone(self, total: int, timeout: float) -> dict:
        """How long the writer takes under supervisord with nobody following."""
        self._reset_writer_log()
        began = time.perf_counter()
        self.rpc.supervisor.startProcess("writer", True)
        finished = self._wait_writer(timeout)
        elapsed = time.perf_counter() - began
        written = os.path.getsize(os.path.join(self.dir, "writer.log"))
        if not finished:
            self.rpc.supervisor.stopProcess("writer", True)
        return {"seconds": elapsed, "bytes": written, "finished": finished}

    def tail_follow(self, total: int, window: float) -> dict:
        """`supervisorctl tail -f writer` from the writer's start, for at most ``window`` s.

        tail -f never ends by itself (not even once the program has exited),
        so it is stopped when it has delivered ``total`` bytes or the window
        closes, whichever is first.
        """
        self._reset_writer_log()
        self.rpc.supervisor.startProcess("writer", True)
        began = time.perf_counter()
        tail = subprocess.Popen([_tool("supervisorctl"), "-c", self.config, "tail", "-f",
                                 "writer"], stdout=subprocess.PIPE, start_new_session=True)
        received = [0]
        first = [None]

        def drain() -> None:
            while True:
                data = tail.stdout.read1(1 << 20)
                if not data:
                    return
                if first[0] is None:
                    first[0] = time.perf_counter() - began
                received[0] += len(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        deadline = began + window
        while received[0] < total and time.perf_counter() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - began
        got = received[0]
        writer_done = self.state("writer") in STOPPED_STATES
        written = os.path.getsize(os.path.join(self.dir, "writer.log"))
        common.stop_process(tail, grace=2)
        reader.join(5)
        if not writer_done:
            self.rpc.supervisor.stopProcess("writer", True)
        return {"seconds": elapsed, "bytes": got, "ttfb": first[0], "writer_bytes": written,
                "writer_finished": writer_done}

    def _wait_writer(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state("writer") in STOPPED_STATES:
                return True
            time.sleep(0.01)
        return False

    def _reset_writer_log(self) -> None:
        if self.state("writer") not in STOPPED_STATES:
            self.rpc.supervisor.stopProcess("writer", True)
        # clearProcessLogs only empties the logs of a running program.
        with open(os.path.join(self.dir, "writer.log"), "wb"):
            pass
