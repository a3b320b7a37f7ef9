"""A small typed client of the TaskManager service, over mutual TLS.

Used by the CLI, the tests and the benchmarks. Failures are raised as
``ClientError`` carrying the gRPC status code and the server's message, so
callers never handle ``grpc.RpcError`` themselves.

The address may name several replicas of one fleet ("a:50051,b:50051"):
a unary call that finds its server UNAVAILABLE tries the next one, and
``fail_over`` moves a follower (taskman.cli.follow) on to the next one.
With several addresses, connecting to each is bounded by CONNECT_TIMEOUT,
so an address that never answers costs seconds, not the call's timeout.
"""

import dataclasses
import datetime
import time
from typing import Iterator, Optional

import grpc

from taskman import tls
from taskman.api import task_manager_pb2, task_manager_pb2_grpc
from taskman.defaults import DEFAULT_ADDRESS

# Unary calls end well within this (none waits on the server: StopTask
# returns once the signal is sent).
DEFAULT_TIMEOUT = 60.0
# How long ``stop`` polls for the task's end by default: the server's default
# stop grace (10 s) and a margin for the SIGKILL and the reap.
STOP_WAIT = 40.0
STOP_POLL_FIRST, STOP_POLL_MAX = 0.05, 0.5  # seconds between status polls
# Seconds to connect (TCP and TLS) to one of several addresses before the
# call moves on to the next. grpc's minimum connect timeout is what bounds it.
CONNECT_TIMEOUT = 3.0
RECONNECT_BACKOFF_MS = 100  # the first; at most ten times that
# A StartTask that met UNAVAILABLE is tried on another replica only when the
# first cannot have started it: no connection was made, or it refused new
# work. Any other UNAVAILABLE (e.g. no host took the task in time) may
# have started it, and a second start would run the command twice.
NOT_STARTED = ("failed to connect", "connection refused", "connect failed", "socket closed",
               "shutting down", "reloading", "handshake", "no connection")


def split_addresses(address: str) -> list:
    """``"a:50051, b:50051"`` as ["a:50051", "b:50051"]; ValueError if none is given."""
    addresses = [part.strip() for part in address.split(",")]
    if not address.strip() or not all(addresses):
        raise ValueError(f"invalid server address {address!r}: expected host:port, "
                         "or several separated by commas")
    return addresses


class ClientError(Exception):
    """A call failed: ``code`` is the grpc.StatusCode, ``message`` the reason."""

    def __init__(self, code: grpc.StatusCode, message: str, address: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.address = address

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, address: str) -> "ClientError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", address)


@dataclasses.dataclass(frozen=True)
class TaskStatus:
    """A TaskStatusResponse in Python types; None/"" for what is not set."""

    task_id: str
    process_id: int
    status: str  # the proto enum name, e.g. JOB_STATUS_EXITED_OK
    exit_code: Optional[int]
    termination_signal: str
    termination_source: str
    start_time: Optional[datetime.datetime]
    end_time: Optional[datetime.datetime]
    # Not in the RFD's response; empty from servers that predate them.
    owner: str = ""
    command: str = ""
    args: tuple = ()
    output_bytes: int = 0
    output_dropped_bytes: int = 0
    output_note: str = ""

    @property
    def running(self) -> bool:
        return self.status == "JOB_STATUS_STARTED"

    @classmethod
    def from_response(cls, response) -> "TaskStatus":
        return cls(
            task_id=response.task_id,
            process_id=response.process_id,
            status=task_manager_pb2.JobStatus.Name(response.status),
            exit_code=response.exit_code if response.HasField("exit_code") else None,
            termination_signal=response.termination_signal,
            termination_source=response.termination_source,
            start_time=_datetime(response, "start_time"),
            end_time=_datetime(response, "end_time"),
            owner=response.owner,
            command=response.command,
            args=tuple(response.args),
            output_bytes=response.output_bytes,
            output_dropped_bytes=response.output_dropped_bytes,
            output_note=response.output_note,
        )


@dataclasses.dataclass(frozen=True)
class QuotaUsage:
    """One quota of GetUsage: its name, the user's use, the limit (0: none)
    and the server option that sets it."""

    name: str
    used: int
    limit: int
    option: str


# OutputSelector names by the word the CLI uses.
SELECTORS = {"all": "OUTPUT_SELECTOR_ALL", "stdout": "OUTPUT_SELECTOR_STDOUT",
             "stderr": "OUTPUT_SELECTOR_STDERR"}


@dataclasses.dataclass(frozen=True)
class OutputChunk:
    """One StreamTaskOutputResponse: ``data`` and where it sits in the output.

    ``offset`` counts the task's combined output whatever view was asked
    for, so ``end`` is where a reconnecting reader continues (``offset=``).
    ``stream`` is "stdout", "stderr" or "combined" (one shared pipe);
    ``time`` is when the server read the bytes (None from older servers).
    """

    data: bytes
    offset: int
    stream: str
    time: Optional[datetime.datetime]

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    @classmethod
    def from_response(cls, response) -> "OutputChunk":
        stream = task_manager_pb2.OutputStream.Name(response.stream)
        return cls(data=response.output, offset=response.offset,
                   stream=stream.rsplit("_", 1)[1].lower(),
                   time=_datetime(response, "time"))


def _datetime(response, field: str) -> Optional[datetime.datetime]:
    if not response.HasField(field):
        return None
    return getattr(response, field).ToDatetime(tzinfo=datetime.timezone.utc)


class TaskmanClient:
    """A channel to one server as one user.

    Give ``user_id`` to use that user's certificate from the certificates
    directory (``certs_dir``, $TASKMAN_CERTS_DIR or the packaged ones), or
    the three paths ``ca_cert``, ``cert`` and ``key``. Raises
    tls.TLSConfigError when the files are missing or invalid.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, user_id: Optional[str] = None, *,
                 certs_dir: Optional[str] = None, ca_cert: Optional[str] = None,
                 cert: Optional[str] = None, key: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT, options=()):
        self.addresses = split_addresses(address)
        if user_id is not None:
            ca_cert, cert, key = tls.client_files(user_id, certs_dir)
        if not (ca_cert and cert and key):
            raise ValueError("give user_id, or ca_cert, cert and key")
        self.timeout = timeout
        self._credentials = tls.channel_credentials(ca_cert, cert, key)
        self._options = list(options)
        if len(self.addresses) > 1:
            self._options.append(("grpc.min_reconnect_backoff_ms", int(CONNECT_TIMEOUT * 1000)))
        else:
            # One address: a server that went away (a reload, a restart) is
            # back there, and grpc's default backoff (1 s, growing by 1.6x up
            # to 120 s) would keep a follower's reconnections failing at once
            # long after it listens again.
            self._options += [("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                              ("grpc.max_reconnect_backoff_ms", 10 * RECONNECT_BACKOFF_MS)]
        self._current = 0
        self._channels: dict = {}  # address -> (channel, stub), made on first use

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._current]

    @property
    def _channel(self):
        return self._connection()[0]

    @property
    def _stub(self):
        return self._connection()[1]

    def _connection(self):
        address = self.address
        if address not in self._channels:
            channel = grpc.secure_channel(address, self._credentials, options=self._options)
            self._channels[address] = (channel, task_manager_pb2_grpc.TaskManagerStub(channel))
        return self._channels[address]

    def fail_over(self) -> str:
        """Move on to the next address (round the list); return it."""
        self._current = (self._current + 1) % len(self.addresses)
        return self.address

    def start(self, command: str, args=(), separate_streams: bool = False,
              node_labels: Optional[dict] = None) -> str:
        """Start ``command args...``; return the new task's id.

        ``separate_streams``: stdout and stderr on a pipe each, so streams
        can tell them apart (their exact interleaving is lost).
        ``node_labels``: in a fleet, run only on a host with every one.
        """
        request = task_manager_pb2.StartTaskRequest(command=command, args=list(args),
                                                    separate_streams=separate_streams,
                                                    node_labels=node_labels or {})
        return self._unary("StartTask", request, retry=_not_started).task_id

    def stop(self, task_id: str, wait: float = STOP_WAIT) -> Optional[TaskStatus]:
        """Stop the task; then poll its status for up to ``wait`` seconds until
        it has ended, and return that status (still running if the grace is
        longer). ``wait`` 0: return once the server has sent the signal (None).

        The server never waits in the call (it would hold one of its workers
        for the whole grace period); the waiting is here.
        """
        self._unary("StopTask", task_manager_pb2.StopTaskRequest(task_id=task_id))
        if wait <= 0:
            return None
        return self.wait_ended(task_id, wait)

    def wait_ended(self, task_id: str, wait: float) -> TaskStatus:
        """Poll the task's status until it is no longer running or ``wait``
        seconds have passed; the last status."""
        deadline = time.monotonic() + wait
        pause = STOP_POLL_FIRST
        while True:
            status = self.status(task_id)
            left = deadline - time.monotonic()
            if not status.running or left <= 0:
                return status
            time.sleep(min(pause, left))
            pause = min(pause * 2, STOP_POLL_MAX)

    def usage(self, user: str = "", all_users: bool = False) -> list:
        """Usage against each per-user quota: [(user, [QuotaUsage])], the
        caller's own by default; an admin may name ``user`` or ask for all."""
        request = task_manager_pb2.GetUsageRequest(user=user, all_users=all_users)
        response = self._unary("GetUsage", request)
        return [(entry.user, [QuotaUsage(line.name, line.used, line.limit, line.option)
                              for line in entry.quotas]) for entry in response.users]

    def status(self, task_id: str) -> TaskStatus:
        request = task_manager_pb2.TaskStatusRequest(task_id=task_id)
        return TaskStatus.from_response(self._unary("GetTaskStatus", request))

    def list(self, statuses=(), owner: str = "", limit: int = 0) -> list:
        """The caller's tasks, newest first (an admin's: everyone's, or ``owner``'s).

        ``statuses``: enum names such as "JOB_STATUS_STARTED" (empty: all).
        ``limit``: at most this many (0: all), fetched page by page. In a
        listing each task's args are cut to about 1 KiB (``status`` has them
        whole).
        """
        found: list = []
        token = ""
        while True:
            want = min(limit - len(found), 1000) if limit else 0
            request = task_manager_pb2.ListTasksRequest(
                statuses=[task_manager_pb2.JobStatus.Value(name) for name in statuses],
                owner=owner, limit=want, page_token=token)
            response = self._unary("ListTasks", request)
            found += [TaskStatus.from_response(task) for task in response.tasks]
            token = response.next_page_token
            if not token or (limit and len(found) >= limit):
                return found[:limit] if limit else found

    def stream(self, task_id: str, timeout: Optional[float] = None) -> Iterator[bytes]:
        """Yield the task's output bytes from the first until the task ends.

        Closing the iterator (or leaving a ``for`` loop early and dropping it)
        cancels the call on the server.
        """
        chunks = self.chunks(task_id, timeout=timeout)
        try:
            for chunk in chunks:
                yield chunk.data
        finally:
            chunks.close()

    def chunks(self, task_id: str, offset: int = 0, selector: str = "all",
               tail_bytes: int = 0, tail_lines: int = 0,
               since: Optional[datetime.datetime] = None, follow: bool = True,
               timeout: Optional[float] = None) -> Iterator[OutputChunk]:
        """Yield the task's output as OutputChunks, until it ends (or, if not
        ``follow``, up to the output present now).

        ``selector``: "all", "stdout" or "stderr" (SELECTORS); ``offset``
        continues an earlier stream (a chunk's ``end``); ``tail_bytes``,
        ``tail_lines`` and ``since`` start later, never before ``offset``.
        Closing the iterator cancels the call on the server.
        """
        request = task_manager_pb2.StreamTaskOutputRequest(
            task_id=task_id, offset=offset,
            selector=task_manager_pb2.OutputSelector.Value(SELECTORS[selector]),
            tail_bytes=tail_bytes, tail_lines=tail_lines, no_follow=not follow)
        if since is not None:
            request.since.FromDatetime(
                since.astimezone(datetime.timezone.utc).replace(tzinfo=None))
        call = self._stub.StreamTaskOutput(request, timeout=timeout)
        try:
            for response in call:
                yield OutputChunk.from_response(response)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error, self.address) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    def server_version(self) -> str:
        """The server's version from a health check's headers ("" if it sends none)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            _, call = stub.Check.with_call(health_pb2.HealthCheckRequest(),
                                           timeout=self.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error, self.address) from None
        return dict(call.initial_metadata()).get("taskman-version", "")

    def close(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> "TaskmanClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unary(self, method, request, retry=lambda failure: True):
        """Call ``method`` (a TaskManager method's name, or a bound stub
        method, which is called once, as it is). Raises ClientError.

        Given by name, a call that meets UNAVAILABLE is made on each other
        address in turn while ``retry(failure)`` allows it; the address that
        answered is kept for the next calls.
        """
        if not isinstance(method, str):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                raise ClientError.from_rpc_error(error, self.address) from None
        failures = []
        for _ in self.addresses:
            try:
                return getattr(self._stub, method)(request, timeout=self.timeout)
            except grpc.RpcError as error:
                failure = ClientError.from_rpc_error(error, self.address)
            failures.append(failure)
            if (len(self.addresses) == 1 or failure.code != grpc.StatusCode.UNAVAILABLE
                    or not retry(failure)):
                raise failure
            self.fail_over()
        raise ClientError(failure.code, "; ".join(f"{one.address}: {one.message.strip()}"
                                                  for one in failures),
                          ", ".join(self.addresses))


def _not_started(failure: ClientError) -> bool:
    """True when an UNAVAILABLE StartTask cannot have started the task."""
    message = failure.message.lower()
    return any(sign in message for sign in NOT_STARTED)
