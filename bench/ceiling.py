"""The transport ceiling: a bare gRPC server answering the TaskManager API
with canned replies.

It serves the taskman server's certificates with mutual TLS, set up under
gevent the way taskman-server is (patch first, then grpc, then
``init_gevent``), with no task, output file, manager, guard or record behind
it. Whatever taskman does, over gRPC it can only be this fast:

- StartTask and GetTaskStatus answer at once with a fixed reply (the
  GetTaskStatus reply is a finished task's, the size taskman sends): the
  floor of a unary call;
- StreamTaskOutput with ``task_id`` "N" sends N bytes as canned 64 KiB
  messages; with "N@PATH" it sends the first N bytes of the file PATH, read
  with ``pread`` 64 KiB at a time (a fresh buffer per message, as taskman's
  reader has), so a follower can check them byte for byte; with "idle" it
  sends one line and then nothing until the client goes (an idle follower).

    python bench/ceiling.py PORT [--gate]

With ``--gate`` StartTask also does the one piece of a start no server can
skip: it spawns /bin/true through the installed taskman-gate, confined as a
sandboxed task is (an unprivileged uid, private mounts, IPC and /proc, no
capabilities), releases the gate and answers; the child is reaped by a libev
child watcher, as taskman-server reaps its tasks. No cgroups, output file,
record or guard: the floor of a start under load (needs root).

$BENCH_SERVER_ARGS (a JSON list of [name, value] pairs) adds gRPC server
channel arguments, so one argument can be measured on this floor and on
taskman-server (bench/args_server.py) alike.
"""

import json
import os
import sys

# The same environment as taskman-server, set before grpc is imported
# (taskman.tls sets these for the real server; see docs/design.md).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", "PSK-AES128-CBC-SHA")

import gevent.monkey  # noqa: I001 (gevent must patch before anything else is imported)

gevent.monkey.patch_all()

import concurrent.futures  # noqa: E402
import threading  # noqa: E402

import grpc  # noqa: E402
import grpc.experimental.gevent  # noqa: E402

grpc.experimental.gevent.init_gevent()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from taskman.api import task_manager_pb2, task_manager_pb2_grpc  # noqa: E402

CHUNK = 64 * 1024
IDLE = "idle"
# Every open stream holds a worker of the pool (as in taskman-server): enough
# for the idle followers' 10,000.
MAX_STREAMS = 12288
# gRPC core cancels a call that waits longer than this (default 30 s) for the
# server to take it. This server takes a new call only when its one polling
# loop reaches the call's event, queued behind a send completion from every
# stream already sending: with 1,000 streams at once the last ones wait
# longer than 30 s and end CANCELLED without a byte (4-8% of them in the
# fan-out runs of 2026-12-02). The followers' own deadline is 900 s: match it.
UNREQUESTED_SECONDS = 900


def server_args() -> list:
    """This server's channel arguments, with $BENCH_SERVER_ARGS's."""
    extra = [tuple(pair) for pair in json.loads(os.environ.get("BENCH_SERVER_ARGS") or "[]")]
    return [("grpc.so_reuseport", 0),
            ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_SECONDS), *extra]


class Ceiling(task_manager_pb2_grpc.TaskManagerServicer):
    def __init__(self, gate: bool = False):
        self.spawn = _gate_spawner() if gate else None
        self.payload = os.urandom(CHUNK)
        self.started = task_manager_pb2.StartTaskResponse(task_id="00000000-0000-4000-8000-000000000001")
        status = task_manager_pb2.TaskStatusResponse(
            task_id=self.started.task_id, exit_code=0, process_id=12345,
            status=task_manager_pb2.JobStatus.Value("JOB_STATUS_EXITED_OK"), owner="client001",
            command="/bin/true", output_bytes=0)
        status.start_time.GetCurrentTime()
        status.end_time.GetCurrentTime()
        self.status = status

    def StartTask(self, request, context):  # noqa: N802 (gRPC's method name)
        if self.spawn is not None:
            self.spawn()
        return self.started

    def GetTaskStatus(self, request, context):  # noqa: N802
        return self.status

    def StreamTaskOutput(self, request, context):  # noqa: N802
        if request.task_id == IDLE:
            yield from _idle(context)
            return
        size, _, path = request.task_id.partition("@")
        remaining = int(size)
        if path:
            yield from _from_file(path, remaining)
            return
        payload = self.payload
        while remaining > 0:
            chunk = payload if remaining >= CHUNK else payload[:remaining]
            remaining -= len(chunk)
            yield task_manager_pb2.StreamTaskOutputResponse(output=chunk)


def _gate_spawner():
    """A function that spawns /bin/true through taskman-gate
    (common.gate_starter), releases it and returns at once; a child watcher
    reaps it."""
    from gevent import get_hub
    from gevent.monkey import get_original

    # The standard library's posix_spawn, as taskman.process spawns (gevent's
    # keeps a table of every dead child for 60 s and scans it at each exit).
    start = common.gate_starter(get_original("os", "posix_spawn"))
    loop = get_hub().loop

    def reaped(watcher) -> None:
        watcher.stop()
        if watcher.rstatus != 0:
            print(f"gate ended with wait status {watcher.rstatus}", file=sys.stderr, flush=True)

    def spawn() -> None:
        pid, gate_write = start()
        try:
            watcher = loop.child(pid, False)
            watcher.start(reaped, watcher)
            os.write(gate_write, b"\n")
        finally:
            os.close(gate_write)

    return spawn


def _idle(context):
    """One line, then nothing until the client goes: a follower of a silent task."""
    yield task_manager_pb2.StreamTaskOutputResponse(output=b"ready\n")
    gone = threading.Event()  # gevent's, once patched
    context.add_callback(gone.set)
    while context.is_active():
        gone.wait(60)


def _from_file(path: str, size: int):
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(CHUNK, size - offset), offset)
            if not chunk:
                return
            offset += len(chunk)
            yield task_manager_pb2.StreamTaskOutputResponse(output=chunk)
    finally:
        os.close(fd)


def main() -> None:
    port = int(sys.argv[1])
    gate = "--gate" in sys.argv[2:]
    common.raise_nofile(65536)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 64),
                         options=server_args())
    task_manager_pb2_grpc.add_TaskManagerServicer_to_server(Ceiling(gate), server)
    credentials = grpc.ssl_server_credentials(
        [(common.read_cert("server.key"), common.read_cert("server.crt"))],
        root_certificates=common.read_cert("ca.crt"), require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    print(f"ceiling listening on 127.0.0.1:{port}{' (StartTask spawns the gate)' if gate else ''}",
          flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
