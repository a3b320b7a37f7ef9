"""The gRPC servicer: the RFD's TaskManager service over a TaskManager.

The one place where library errors become gRPC status codes (``STATUS_FOR``),
where the caller's identity is taken from the client certificate (through
``taskman.tls``), and where every call is logged, once, with its outcome.
Runs under gevent: every handler is a greenlet, so waiting for output blocks
nothing else.
"""

import contextlib
import logging
import time
from typing import Iterator, Optional

import gevent.event
import grpc

from taskman import tls
from taskman.api import task_manager_pb2, task_manager_pb2_grpc
from taskman.errors import CgroupError, InvalidArgument, NotFound, ResourceExhausted, TaskmanError, Unavailable
from taskman.manager import TaskManager
from taskman.task import Task

log = logging.getLogger("taskman.service")

# Library error -> gRPC status, most specific first (the first isinstance
# match wins). NotFound covers "not yours" as well as "not there".
STATUS_FOR = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),  # CommandNotFound, NotExecutable
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (CgroupError, grpc.StatusCode.INTERNAL),
    (TaskmanError, grpc.StatusCode.INTERNAL),
)

DEFAULT_MAX_STREAMS = 256
# Executor workers kept for unary calls on top of one per stream: a stream
# holds its worker for its whole life (NOTES.md), and a StopTask may hold one
# for the stop grace period.
UNARY_WORKERS = 32


def status_for(error: TaskmanError) -> grpc.StatusCode:
    for kind, code in STATUS_FOR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def message_for(error: TaskmanError) -> str:
    """The client-facing text: the library writes its messages for users."""
    message = str(error) or type(error).__name__
    if isinstance(error, CgroupError):
        return f"server cgroup error: {message}"
    return message


def status_response(task: Task) -> task_manager_pb2.TaskStatusResponse:
    """Fill a TaskStatusResponse; the exit code and end time only once ended."""
    response = task_manager_pb2.TaskStatusResponse(
        task_id=task.id, process_id=task.pid, status=int(task.status),
        termination_signal=task.signal, termination_source=task.source.value)
    if task.start_time is not None:
        response.start_time.FromDatetime(task.start_time)
    if not task.running:
        if task.exit_code is not None:
            response.exit_code = task.exit_code
        if task.end_time is not None:
            response.end_time.FromDatetime(task.end_time)
    return response


class _Call:
    """What the per-call log line reports."""

    def __init__(self, method: str, task_id: str):
        self.method = method
        self.task_id = task_id
        self.user = "-"
        self.code = grpc.StatusCode.CANCELLED  # until it is known to be otherwise
        self.sent = None  # bytes, for streams


class TaskManagerServicer(task_manager_pb2_grpc.TaskManagerServicer):
    """Serves ``manager`` to mutually authenticated TLS 1.3 clients.

    ``max_streams``: open StreamTaskOutput calls beyond which new ones get
    RESOURCE_EXHAUSTED. Size the server's executor with ``executor_workers``.
    """

    def __init__(self, manager: TaskManager, max_streams: int = DEFAULT_MAX_STREAMS):
        self.manager = manager
        self.max_streams = max_streams
        self.open_streams = 0

    @staticmethod
    def executor_workers(max_streams: int) -> int:
        return max_streams + UNARY_WORKERS

    def StartTask(self, request, context):
        with self._call(context, "StartTask", "") as call:
            task = self.manager.start(call.user, request.command, list(request.args))
            call.task_id = task.id
            return task_manager_pb2.StartTaskResponse(task_id=task.id)

    def StopTask(self, request, context):
        with self._call(context, "StopTask", request.task_id) as call:
            self.manager.stop(call.user, request.task_id)
            return task_manager_pb2.StopTaskResponse()

    def GetTaskStatus(self, request, context):
        with self._call(context, "GetTaskStatus", request.task_id) as call:
            return status_response(self.manager.status(call.user, request.task_id))

    def StreamTaskOutput(self, request, context) -> Iterator:
        with self._call(context, "StreamTaskOutput", request.task_id) as call:
            if self.open_streams >= self.max_streams:
                raise ResourceExhausted(f"too many open output streams (limit "
                                        f"{self.max_streams}); try again later")
            # Woken when the client goes away, so the follower never waits
            # for output nobody will read (and its worker is given back).
            cancelled = gevent.event.Event()
            if not context.add_callback(cancelled.set):
                cancelled.set()
            # No greenlet switch between the check above and this increment.
            chunks = self.manager.stream(call.user, request.task_id, cancelled)
            self.open_streams += 1
            call.sent = 0
            try:
                for chunk in chunks:
                    call.sent += len(chunk)
                    yield task_manager_pb2.StreamTaskOutputResponse(output=chunk)
            finally:
                self.open_streams -= 1
                chunks.close()

    @contextlib.contextmanager
    def _call(self, context, method: str, task_id: str):
        """Authenticate, run the body, map its error to a status, log one line."""
        call = _Call(method, task_id)
        started = time.monotonic()
        failure: Optional[str] = None
        try:
            call.user = tls.caller(context).user
            yield call
            if call.code is grpc.StatusCode.CANCELLED and context.is_active():
                call.code = grpc.StatusCode.OK
        except tls.Unauthenticated as error:
            call.code, failure = grpc.StatusCode.UNAUTHENTICATED, str(error)
        except TaskmanError as error:
            call.code, failure = status_for(error), message_for(error)
        except Exception:
            log.exception("%s by %s failed", method, call.user)
            call.code, failure = grpc.StatusCode.INTERNAL, "internal server error"
        finally:
            _log_call(call, time.monotonic() - started)
        if failure is not None:
            context.abort(call.code, failure)


def _log_call(call: _Call, elapsed: float) -> None:
    sent = "" if call.sent is None else f" sent={call.sent}"
    log.info("user=%s method=%s task=%s code=%s%s time=%.1fms", call.user, call.method,
             call.task_id or "-", call.code.name, sent, elapsed * 1000)
