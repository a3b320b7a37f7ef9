"""The call guard: what every call to the server goes through, whatever its service.

The one place where library errors become gRPC status codes (``STATUS_FOR``),
where the caller's identity is taken from the client certificate (through
``taskman.tls``), where output, health and reflection streams are admitted,
and where every call is reported once (log line, audit record, metrics).
The TaskManager servicer and the interceptor for the other services share one.
"""

import contextlib
import logging
import re
import time
from typing import Iterator, Optional

import grpc

from taskman import tls, turns
from taskman.defaults import DEFAULT_MAX_HEALTH_STREAMS, DEFAULT_MAX_STREAMS, version
from taskman.errors import (
    CgroupError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TaskmanError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("taskman.service")

# Library error -> gRPC status, most specific first (the first isinstance
# match wins). NotFound covers "not yours" as well as "not there".
STATUS_FOR = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),  # CommandNotFound, NotExecutable
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (CgroupError, grpc.StatusCode.INTERNAL),
    (TaskmanError, grpc.StatusCode.INTERNAL),
)

# Sent as initial metadata on every call: the health response has no field
# for the server's version, and a client can read headers of any call.
VERSION_METADATA = (("taskman-version", version()),)
# True once grpcio adds VERSION_METADATA itself to every call's initial
# metadata, in the batch that carries the reply (``send_version_with_replies``).
_VERSION_WITH_REPLIES = False


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


class Call:
    """One call as the log line, the audit trail and the metrics report it."""

    def __init__(self, method: str, task_id: str, context, streaming: bool, audited: bool):
        self.method = method
        self.task_id = task_id
        self.context = context
        self.streaming = streaming
        self.audited = audited  # False: audit only if refused (health probes)
        self.user = "-"
        self.code = grpc.StatusCode.CANCELLED  # until it is known to be otherwise
        self.sent = None  # bytes, for streams
        self.answered: Optional[float] = None  # monotonic time a stream was accepted

    @property
    def peer(self) -> str:
        """The client's address, asked of gRPC only when a record needs it."""
        return self.context.peer()


class CallGuard:
    """What every call to the server goes through, whatever its service.

    ``call`` authenticates the caller, maps the body's error to a status and
    reports the outcome once (log line, audit record, metrics);
    ``admit_stream`` holds a stream's place among the ``max_streams`` open
    output streams, since each holds an executor worker for its whole life;
    ``admit_service_stream`` does the same for health Watch and reflection
    streams within their own, smaller ``max_health_streams``, so neither kind
    can take the other's places; ``send_turns`` (a taskman.turns.Turns)
    shares the sending of output among open streams, fairly by user, and
    ``call_turns`` (a taskman.turns.CallTurns) runs each user's unary calls
    a few at a time while others are active; ``call_rate`` and ``send_rate``
    pace a flooding user's calls and each user's sends then (0: no pace). The
    TaskManager servicer and ``GuardInterceptor`` (for health checking and
    reflection) share one guard.
    """

    def __init__(self, max_streams: int = DEFAULT_MAX_STREAMS, audit=None, metrics=None,
                 peers=None, max_health_streams: int = DEFAULT_MAX_HEALTH_STREAMS,
                 send_turns: Optional[turns.Turns] = None,
                 call_turns: Optional[turns.CallTurns] = None,
                 call_rate: float = turns.CALL_RATE, send_rate: float = turns.SEND_RATE):
        self.max_streams = max_streams
        self.open_streams = 0
        self.max_health_streams = max_health_streams
        self.open_health_streams = 0
        # One record of who is active, so a user streaming counts as active
        # for another's calls and the other way round.
        activity = turns.Activity()
        self.send_turns = send_turns or turns.Turns(rate=send_rate, activity=activity)
        self.call_turns = call_turns or turns.CallTurns(rate=call_rate, activity=activity)
        self.audit = audit
        self.metrics = metrics
        # Who callers are: a pki.PeerCheck or credentials.Peers (revocations).
        self.peers = peers
        # Open streams' contexts -> (user, certificate PEM), to end revoked ones.
        self.streams = {}
        # Open output streams' contexts -> the Event that wakes them, and why
        # they were all woken (``drain``), if they were.
        self.wakers = {}
        self.draining: Optional[str] = None
        if metrics is not None:
            metrics.streams_active.set_function(lambda: self.open_streams)
        send_version_with_replies()

    @contextlib.contextmanager
    def call(self, context, method: str, task_id: str = "", *, streaming: bool = False,
             audited: bool = True) -> Iterator[Call]:
        """Run the body as ``method``'s call; on an error, abort the call with
        the status and message STATUS_FOR gives it."""
        call = Call(method, task_id, context, streaming, audited)
        _send_version(context)
        started = time.monotonic()
        failure: Optional[str] = None
        try:
            identity = tls.caller(context, self.peers)
            call.user = identity.user
            if streaming:
                self.streams[context] = (identity.user, identity.pem)
            yield call
            if call.code is grpc.StatusCode.CANCELLED and context.is_active():
                # A handler may set a code without raising (grpc_health's
                # Check sets NOT_FOUND for an unknown service).
                call.code = _code_set(context) or grpc.StatusCode.OK
        except TaskmanError as error:
            call.code, failure = status_for(error), message_for(error)
        except Exception:
            log.exception("%s by %s failed", escape(method), escape(call.user))
            call.code, failure = grpc.StatusCode.INTERNAL, "internal server error"
        finally:
            self.streams.pop(context, None)
            ended = time.monotonic()
            if failure is None and not streaming:
                # Reported once the reply is out, so the caller does not wait
                # for its own log line and record; a refusal is reported
                # before the caller learns of it.
                when_done(context, lambda: self._observe(call, started, ended, None))
            else:
                self._observe(call, started, ended, failure)
        if failure is not None:
            context.abort(call.code, failure)

    @contextlib.contextmanager
    def admit_stream(self, kind: str = "streams"):
        """Count a stream as open for the body's duration; ResourceExhausted
        (naming ``kind``) when ``max_streams`` are open already."""
        # No greenlet switch between the check and the increment.
        if self.open_streams >= self.max_streams:
            raise ResourceExhausted(f"too many open {kind} (limit {self.max_streams}); "
                                    "try again later")
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1

    @contextlib.contextmanager
    def admit_service_stream(self):
        """Like ``admit_stream``, for health Watch and reflection streams,
        counted apart within ``max_health_streams``."""
        if self.open_health_streams >= self.max_health_streams:
            raise ResourceExhausted(f"too many open health and reflection streams "
                                    f"(limit {self.max_health_streams}); try again later")
        self.open_health_streams += 1
        try:
            yield
        finally:
            self.open_health_streams -= 1

    @contextlib.contextmanager
    def wakeable(self, context, event):
        """Let ``drain`` wake the stream that waits on ``event``; on leaving,
        Unavailable if it was drained, so its client reconnects elsewhere or
        later from the offset it reached (a cancelled stream reads as final)."""
        self.wakers[context] = event
        try:
            yield
        finally:
            self.wakers.pop(context, None)
        if self.draining is not None:
            raise Unavailable(self.draining)

    def drain(self, reason: str) -> int:
        """End every open output stream with UNAVAILABLE (``reason``) before
        the server stops serving; return how many were open."""
        self.draining = reason
        for event in list(self.wakers.values()):
            event.set()
        return len(self.wakers)

    def end_revoked_streams(self, peers) -> int:
        """Cancel the open streams whose certificate ``peers`` now refuses
        (revoked); return how many. Runs periodically (server.serve)."""
        ended = 0
        for context, (user, pem) in list(self.streams.items()):
            if peers.is_revoked(pem):
                self.streams.pop(context, None)
                log.info("ending a stream of %s: certificate revoked", user)
                if self.audit is not None:
                    self.audit.call(user, "StreamEnded", "UNAUTHENTICATED", peer=context.peer(),
                                    detail="the client certificate was revoked")
                context.cancel()
                ended += 1
        return ended

    def _observe(self, call: Call, started: float, ended: float,
                 failure: Optional[str]) -> None:
        """The log line, the audit record and the metrics of one finished call."""
        _log_call(call, ended - started)
        refused = call.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
        if self.audit is not None and (call.audited or refused):
            self.audit.call(call.user, call.method, call.code.name, task_id=call.task_id,
                            peer=call.peer, detail=failure, duration_ms=(ended - started) * 1000)
        if self.metrics is not None:
            # Streams: time to accept (or refuse) them, not their whole life.
            answered = call.answered if call.answered is not None else ended
            self.metrics.rpc(call.method, call.code.name).observe(answered - started)
            if call.code is grpc.StatusCode.RESOURCE_EXHAUSTED and call.streaming:
                self.metrics.streams_refused.inc()


def _log_call(call: Call, elapsed: float) -> None:
    sent = "" if call.sent is None else f" sent={call.sent}"
    # The task id is the client's text until validated: never let it flood
    # the log or forge a line (a newline in it would).
    task_id = call.task_id[:40] + "..." if len(call.task_id) > 40 else call.task_id
    log.info("user=%s method=%s task=%s code=%s%s time=%.1fms", escape(call.user),
             escape(call.method), escape(task_id) or "-", call.code.name, sent, elapsed * 1000)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` with control characters (newlines too) as Python escapes
    (\\n, \\x1b, \\u2028): client strings in a log stay on one line."""
    return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)


def send_version_with_replies() -> bool:
    """Have grpcio's server put VERSION_METADATA in every call's initial
    metadata itself; True if it does (now or already).

    ``context.send_initial_metadata`` starts a batch of its own, answered by
    a completion event of its own, before the reply's. Left alone, grpcio
    sends a call's initial metadata in the reply's batch (with the first
    message, the status or the abort), through ``grpc._server.
    _get_initial_metadata``, the one function every such batch asks for what
    to send; wrapped here, it adds the version, so every response still
    carries it without a batch of its own. That function is private to
    grpcio: if a release renames it, this returns False and ``call`` sends
    the header explicitly as before. Process-wide, for the servers of a
    process that guards its calls.
    """
    global _VERSION_WITH_REPLIES
    if _VERSION_WITH_REPLIES:
        return True
    from grpc import _server

    original = getattr(_server, "_get_initial_metadata", None)
    if not callable(original) or original.__code__.co_varnames[:2] != ("state", "metadata"):
        log.warning("grpcio %s: the version header goes in a batch of its own "
                    "(grpc._server._get_initial_metadata not found)", grpc.__version__)
        return False

    def _get_initial_metadata(state, metadata):
        return original(state, VERSION_METADATA + tuple(metadata or ()))

    _server._get_initial_metadata = _get_initial_metadata
    _VERSION_WITH_REPLIES = True
    return True


def _send_version(context) -> None:
    if _VERSION_WITH_REPLIES:
        return  # grpcio adds it to the reply's batch
    send = getattr(context, "send_initial_metadata", None)  # absent from test doubles
    if send is not None:
        send(VERSION_METADATA)


def when_done(context, callback) -> None:
    """Run ``callback`` when the call has ended (its reply sent), or now if
    it has already."""
    add_callback = getattr(context, "add_callback", None)  # absent from test doubles
    if add_callback is None or not add_callback(callback):
        callback()


def _code_set(context) -> Optional[grpc.StatusCode]:
    """The status code a handler set with ``context.set_code``, if any."""
    try:
        return context.code()
    except AttributeError:  # a context without code() (older grpcio, test doubles)
        return None
