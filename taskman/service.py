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
from taskman.task import JobStatus, Task

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

# ListTasks pages: default and largest size, and the arguments kept per task,
# so a page stays far below gRPC's 4 MiB message limit.
LIST_PAGE_SIZE = 500
LIST_PAGE_MAX = 1000
LIST_ARGS_CHARS = 1024


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


def status_response(task: Task, args_chars: int = 0) -> task_manager_pb2.TaskStatusResponse:
    """Fill a TaskStatusResponse; the exit code and end time only once ended.

    ``args_chars`` > 0 cuts the arguments to about that many characters (for
    listings, whose messages must stay far below gRPC's 4 MiB limit).
    """
    response = task_manager_pb2.TaskStatusResponse(
        task_id=task.id, process_id=task.pid, status=int(task.status),
        termination_signal=task.signal, termination_source=task.source.value,
        owner=task.owner, command=task.command, args=_cut(task.args, args_chars),
        output_bytes=task.output_size, output_dropped_bytes=task.output_dropped,
        output_note=task.output_note)
    if task.start_time is not None:
        response.start_time.FromDatetime(task.start_time)
    if not task.running:
        if task.exit_code is not None:
            response.exit_code = task.exit_code
        if task.end_time is not None:
            response.end_time.FromDatetime(task.end_time)
    return response


def _cut(args: list, chars: int) -> list:
    if not chars or sum(map(len, args)) <= chars:
        return args
    kept = []
    for argument in args:
        if len(argument) >= chars:
            kept.append(argument[:chars] + "...")
            break
        kept.append(argument)
        chars -= len(argument)
    return kept


class _Call:
    """What the per-call log line reports."""

    def __init__(self, method: str, task_id: str):
        self.method = method
        self.task_id = task_id
        self.user = "-"
        self.code = grpc.StatusCode.CANCELLED  # until it is known to be otherwise
        self.sent = None  # bytes, for streams
        self.peer = ""
        self.answered: Optional[float] = None  # monotonic time a stream was accepted
        self.audited = True  # False: audit only if refused (health probes)
        self.streaming = False


class TaskManagerServicer(task_manager_pb2_grpc.TaskManagerServicer):
    """Serves ``manager`` to mutually authenticated TLS 1.3 clients.

    ``max_streams``: open StreamTaskOutput calls beyond which new ones get
    RESOURCE_EXHAUSTED. Size the server's executor with ``executor_workers``.
    ``audit`` (a taskman.audit.AuditLog) and ``metrics`` (a
    taskman.metrics.Metrics) are told of every call when given.
    """

    def __init__(self, manager: TaskManager, max_streams: int = DEFAULT_MAX_STREAMS,
                 audit=None, metrics=None):
        self.manager = manager
        self.max_streams = max_streams
        self.open_streams = 0
        self.audit = audit
        self.metrics = metrics
        if metrics is not None:
            metrics.streams_active.set_function(lambda: self.open_streams)

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

    def ListTasks(self, request, context):
        with self._call(context, "ListTasks", "") as call:
            statuses = [JobStatus(value) for value in request.statuses
                        if value in JobStatus._value2member_map_]
            if len(statuses) != len(request.statuses):
                raise InvalidArgument("unknown job status in the filter")
            page_size = min(request.limit or LIST_PAGE_SIZE, LIST_PAGE_MAX)
            # One more than the page tells whether another page follows.
            tasks = self.manager.tasks(call.user, owner=request.owner or None,
                                       statuses=statuses, limit=page_size + 1,
                                       after=request.page_token or None)
            response = task_manager_pb2.ListTasksResponse(
                tasks=[status_response(task, LIST_ARGS_CHARS) for task in tasks[:page_size]])
            if len(tasks) > page_size:
                response.next_page_token = tasks[page_size - 1].id
            return response

    def StreamTaskOutput(self, request, context) -> Iterator:
        with self._call(context, "StreamTaskOutput", request.task_id, streaming=True) as call:
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
            call.answered = time.monotonic()
            sent_bytes = self.metrics.stream_bytes if self.metrics is not None else None
            try:
                for chunk in chunks:
                    call.sent += len(chunk)
                    if sent_bytes is not None:
                        sent_bytes.inc(len(chunk))  # live, so a long stream shows as it goes
                    yield task_manager_pb2.StreamTaskOutputResponse(output=chunk)
            finally:
                self.open_streams -= 1
                chunks.close()

    @contextlib.contextmanager
    def _call(self, context, method: str, task_id: str, streaming: bool = False):
        """Authenticate, run the body, map its error to a status, log one line
        (and an audit record and the call's metrics, when configured)."""
        call = _Call(method, task_id)
        call.peer = context.peer()
        call.streaming = streaming
        started = time.monotonic()
        failure: Optional[str] = None
        try:
            call.user = tls.caller(context).user
            yield call
            if call.code is grpc.StatusCode.CANCELLED and context.is_active():
                # A handler may set a code without raising (grpc_health's
                # Check sets NOT_FOUND for an unknown service).
                call.code = _code_set(context) or grpc.StatusCode.OK
        except tls.Unauthenticated as error:
            call.code, failure = grpc.StatusCode.UNAUTHENTICATED, str(error)
        except TaskmanError as error:
            call.code, failure = status_for(error), message_for(error)
        except Exception:
            log.exception("%s by %s failed", method, call.user)
            call.code, failure = grpc.StatusCode.INTERNAL, "internal server error"
        finally:
            self._observe(call, started, failure)
        if failure is not None:
            context.abort(call.code, failure)

    def _observe(self, call: _Call, started: float, failure: Optional[str]) -> None:
        """The log line, the audit record and the metrics of one finished call."""
        ended = time.monotonic()
        _log_call(call, ended - started)
        refused = call.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
        if self.audit is not None and (call.audited or refused):
            self.audit.call(call.user, call.method, call.code.name, task_id=call.task_id,
                            peer=call.peer, detail=failure, duration_ms=(ended - started) * 1000)
        if self.metrics is not None:
            # Streams: time to accept (or refuse) them, not their whole life.
            answered = call.answered if call.answered is not None else ended
            self.metrics.rpc_duration.labels(call.method, call.code.name).observe(
                answered - started)
            if call.code is grpc.StatusCode.RESOURCE_EXHAUSTED and call.streaming:
                self.metrics.streams_refused.inc()


def _log_call(call: _Call, elapsed: float) -> None:
    sent = "" if call.sent is None else f" sent={call.sent}"
    # The task id is the client's text until validated: never let it flood the log.
    task_id = repr(call.task_id[:40]) + "..." if len(call.task_id) > 40 else call.task_id
    log.info("user=%s method=%s task=%s code=%s%s time=%.1fms", call.user, call.method,
             task_id or "-", call.code.name, sent, elapsed * 1000)


def _code_set(context) -> Optional[grpc.StatusCode]:
    """The status code a handler set with ``context.set_code``, if any."""
    try:
        return context.code()
    except AttributeError:  # a context without code() (older grpcio, test doubles)
        return None


# -- the server's other services (health checking, reflection)

OWN_METHODS = "/" + task_manager_pb2.DESCRIPTOR.services_by_name["TaskManager"].full_name + "/"
HEALTH_METHODS = "grpc.health.v1.Health/"


class GuardInterceptor(grpc.ServerInterceptor):
    """Puts every call to the server's other services through ``servicer._call``.

    Health checking and reflection carry no task data, but they share the
    mTLS port, so they get the same identity and TLS 1.3 guard, log line,
    audit record and metrics as TaskManager's own methods (which call
    ``_call`` themselves and pass through untouched). Their streams (Health
    Watch, ServerReflectionInfo) each hold an executor worker, so they count
    against the servicer's stream limit. Successful health calls are not
    audited: probes every few seconds would bury the trail; refused ones are.
    """

    def __init__(self, servicer: Optional[TaskManagerServicer] = None):
        self.servicer = servicer  # may be set later, before the server starts

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OWN_METHODS):
            return handler
        return _guarded(handler, self.servicer, method.lstrip("/"))


def _guarded(handler, servicer: TaskManagerServicer, name: str):
    """``handler`` with its behaviour run inside ``servicer._call``."""
    audited = not name.startswith(HEALTH_METHODS)
    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def serve(request, context):
            with servicer._call(context, name, "", streaming=True) as call:
                call.audited = audited
                if servicer.open_streams >= servicer.max_streams:
                    raise ResourceExhausted(f"too many open streams (limit "
                                            f"{servicer.max_streams}); try again later")
                servicer.open_streams += 1
                call.answered = time.monotonic()
                try:
                    yield from behavior(request, context)
                finally:
                    servicer.open_streams -= 1
    else:
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

        def serve(request, context):
            with servicer._call(context, name, "") as call:
                call.audited = audited
                return behavior(request, context)

    wrap = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return wrap[handler.request_streaming, handler.response_streaming](
        serve, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
