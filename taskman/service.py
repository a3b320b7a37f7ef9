"""The gRPC servicer: the RFD's TaskManager service over a TaskManager.

Every call goes through a ``taskman.guard.CallGuard`` (identity, the one
error -> status table, stream admission, the log line, audit and metrics);
the servicer turns requests into library calls and results into responses.
Runs under gevent: every handler is a greenlet, so waiting for output blocks
nothing else.
"""

import contextlib
import logging
import time
from typing import Iterator, Optional

import gevent.event
import grpc

from taskman.api import task_manager_pb2, task_manager_pb2_grpc
from taskman.defaults import DEFAULT_MAX_HEALTH_STREAMS, DEFAULT_MAX_STREAMS
from taskman.errors import InvalidArgument
from taskman.guard import (  # noqa: F401 - re-exported: the servicer's edge in one import
    STATUS_FOR,
    Call,
    CallGuard,
    escape,
    message_for,
    status_for,
    when_done,
)
from taskman.page_tokens import INVALID_TOKEN, PageTokens
from taskman.quotas import Quotas
from taskman.responses import (  # noqa: F401
    output_response,
    status_reply,
    status_response,
    stream_view,
    usage_response,
)
from taskman.task import JobStatus

log = logging.getLogger("taskman.service")

# Executor workers kept for unary calls on top of one per stream (output,
# health and reflection): a stream holds its worker for its whole life
# (docs/design.md). No unary call waits: StopTask returns once the signal is sent.
UNARY_WORKERS = 32

# ListTasks pages: default and largest size, and the arguments kept per task,
# so a page stays far below gRPC's 4 MiB message limit.
LIST_PAGE_SIZE = 500
LIST_PAGE_MAX = 1000
LIST_ARGS_CHARS = 1024

class TaskManagerServicer(task_manager_pb2_grpc.TaskManagerServicer):
    """Serves ``manager`` to mutually authenticated TLS 1.3 clients.

    Every call goes through ``guard`` (a CallGuard; by default one made of
    ``max_streams``, ``audit`` and ``metrics``): beyond its stream limit new
    StreamTaskOutput calls get RESOURCE_EXHAUSTED. ``audit`` is a
    taskman.audit.AuditLog, ``metrics`` a taskman.metrics.Metrics. Size the
    server's executor with ``executor_workers``.

    ``quotas`` (a taskman.quotas.Quotas, the server's one, which the manager
    shares) holds each call among its user's calls in flight and each
    output stream among its user's open streams; ``users`` lists the users an
    admin's GetUsage covers (default: the owners of the tasks listed).
    """

    def __init__(self, manager, max_streams: int = DEFAULT_MAX_STREAMS, audit=None,
                 metrics=None, guard: Optional[CallGuard] = None,
                 quotas: Optional[Quotas] = None, users=None):
        self.manager = manager
        self.guard = guard or CallGuard(max_streams, audit=audit, metrics=metrics)
        self.quotas = quotas or Quotas()
        self.users = users
        self.page_tokens = PageTokens()

    @staticmethod
    def executor_workers(max_streams: int,
                         max_health_streams: int = DEFAULT_MAX_HEALTH_STREAMS) -> int:
        return max_streams + max_health_streams + UNARY_WORKERS

    # The guard's hooks, so a servicer can stand for its guard (GuardInterceptor).
    def call(self, context, method: str, task_id: str = "", **options):
        return self.guard.call(context, method, task_id, **options)

    def admit_stream(self, kind: str = "streams"):
        return self.guard.admit_stream(kind)

    def admit_service_stream(self):
        return self.guard.admit_service_stream()

    @contextlib.contextmanager
    def unary(self, context, method: str, task_id: str = "") -> Iterator[Call]:
        """``call`` for a unary method, held among the caller's calls in
        flight, run in one of the caller's turns (taskman.turns.CallTurns),
        which it keeps until its reply is sent."""
        with self.call(context, method, task_id) as call, self.quotas.acquire_call(call.user):
            give_back = self.guard.call_turns.take(call.user)
            try:
                yield call
            finally:
                when_done(context, give_back)

    def StartTask(self, request, context):
        with self.unary(context, "StartTask") as call:
            placement = {}
            if request.node_labels:  # only a fleet chooses among hosts
                if not getattr(self.manager, "places_by_labels", False):
                    raise InvalidArgument("node labels need a fleet server (--fleet); "
                                          "this server runs tasks on its own host")
                placement["node_labels"] = dict(request.node_labels)
            task = self.manager.start(call.user, request.command, list(request.args),
                                      separate_streams=request.separate_streams, **placement)
            call.task_id = task.id
            return task_manager_pb2.StartTaskResponse(task_id=task.id)

    def StopTask(self, request, context):
        with self.unary(context, "StopTask", request.task_id) as call:
            # Signal sent, then return: waiting for the end (up to the grace)
            # would hold a worker; `taskman stop` polls the status instead.
            self.manager.stop(call.user, request.task_id, wait=0)
            return task_manager_pb2.StopTaskResponse()

    def GetTaskStatus(self, request, context):
        with self.unary(context, "GetTaskStatus", request.task_id) as call:
            return status_reply(self.manager.status(call.user, request.task_id))

    def ListTasks(self, request, context):
        with self.unary(context, "ListTasks") as call:
            statuses = [JobStatus(value) for value in request.statuses
                        if value in JobStatus._value2member_map_]
            if len(statuses) != len(request.statuses):
                raise InvalidArgument("unknown job status in the filter")
            page_size = min(request.limit or LIST_PAGE_SIZE, LIST_PAGE_MAX)
            after = None
            if request.page_token:
                after = self.page_tokens.read(call.user, request.page_token)
            # One more than the page tells whether another page follows.
            try:
                tasks = self.manager.tasks(call.user, owner=request.owner or None,
                                           statuses=statuses, limit=page_size + 1, after=after)
            except InvalidArgument:
                if after is None:
                    raise
                # The token's task is gone (retention): the same sentence as
                # for any other token, so none tells what exists.
                raise InvalidArgument(INVALID_TOKEN) from None
            response = task_manager_pb2.ListTasksResponse(
                tasks=[status_response(task, LIST_ARGS_CHARS) for task in tasks[:page_size]])
            if len(tasks) > page_size:
                response.next_page_token = self.page_tokens.make(call.user,
                                                                 tasks[page_size - 1].id)
            return response

    def GetUsage(self, request, context):
        with self.unary(context, "GetUsage") as call:
            admin = call.user in self.manager.admins
            if request.all_users:
                if not admin:
                    raise InvalidArgument("only an admin may see every user's usage")
                users = sorted(set(self._known_users(call.user)) | {call.user})
            else:
                user = request.user or call.user
                if user != call.user and not admin:
                    raise InvalidArgument("only an admin may see another user's usage")
                users = [user]
            return usage_response((user, self.quotas.usage(user)) for user in users)

    def _known_users(self, admin: str) -> list:
        if self.users is not None:
            return self.users()
        return {task.owner for task in self.manager.tasks(admin)}

    def StreamTaskOutput(self, request, context) -> Iterator:
        with self.call(context, "StreamTaskOutput", request.task_id, streaming=True) as call, \
                self.admit_stream("output streams"), self.quotas.acquire_stream(call.user):
            # Woken when the client goes away, so the follower never waits
            # for output nobody will read (and its worker is given back).
            cancelled = gevent.event.Event()
            if not context.add_callback(cancelled.set):
                cancelled.set()
            chunks = self.manager.chunks(call.user, request.task_id, cancelled,
                                         **stream_view(request))
            call.sent = 0
            call.answered = time.monotonic()
            metrics = self.guard.metrics
            sent_bytes = metrics.stream_bytes if metrics is not None else None
            turns = self.guard.send_turns
            with self.guard.wakeable(context, cancelled):
                try:
                    for chunk in chunks:
                        if cancelled.is_set():  # gone, drained or revoked: also when behind
                            break
                        # The turn is held from building the message until
                        # the send is done: a few sends at a time, so other
                        # calls are not queued behind them, and a stream
                        # waiting for its turn holds only the chunk read, not
                        # its message too (1,000 followers behind a fast
                        # writer: one 64 KiB copy each, not two).
                        with turns.turn(call.user):
                            # A reload's drain may have come while this
                            # stream waited for its turn: end now, with the
                            # drain's status, not when its grace cancels it.
                            if cancelled.is_set():
                                break
                            call.sent += len(chunk.data)
                            if sent_bytes is not None:
                                sent_bytes.inc(len(chunk.data))  # live, as a long stream goes
                            response = output_response(chunk)
                            chunk = None
                            yield response
                            response = None
                finally:
                    chunks.close()


# -- the server's other services (health checking, reflection)

OWN_METHODS = "/" + task_manager_pb2.DESCRIPTOR.services_by_name["TaskManager"].full_name + "/"
HEALTH_METHODS = "grpc.health.v1.Health/"


class GuardInterceptor(grpc.ServerInterceptor):
    """Puts every call to the server's other services through ``guard``.

    ``guard``: a CallGuard, or a TaskManagerServicer (which stands for its
    own). Health checking and reflection carry no task data, but they share
    the mTLS port, so they get the same identity and TLS 1.3 check, log line,
    audit record and metrics as TaskManager's own methods (which go through
    the guard themselves and pass here untouched). Their streams (Health
    Watch, ServerReflectionInfo) each hold an executor worker, so they count
    against a stream limit of their own (``admit_service_stream``), never
    against the output streams'. Successful health calls are not audited:
    probes every few seconds would bury the trail; refused ones are.
    """

    def __init__(self, guard):
        self.guard = guard

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OWN_METHODS):
            return handler
        return _guarded(handler, self.guard, method.lstrip("/"))


def _guarded(handler, guard, name: str):
    """``handler`` with its behaviour run inside ``guard.call``."""
    audited = not name.startswith(HEALTH_METHODS)
    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def serve(request, context):
            with guard.call(context, name, streaming=True, audited=audited) as call, \
                    guard.admit_service_stream():
                call.answered = time.monotonic()
                yield from behavior(request, context)
    else:
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

        def serve(request, context):
            with guard.call(context, name, audited=audited):
                return behavior(request, context)

    wrap = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return wrap[handler.request_streaming, handler.response_streaming](
        serve, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
