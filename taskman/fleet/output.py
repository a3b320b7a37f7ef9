"""A task's output in the fleet: its host publishes, any replica follows.

The host pumps the task's local output log, chunk by chunk, to the task's own
subject in the file-backed output stream, each message labelled with the
chunk's offset, stream and read time; a last, empty message marks the end.
A follower on any replica replays the subject from its first message with an
ordered consumer (gaps are re-fetched by the client, never skipped) and
follows it live until that end marker, so followers see the very bytes the
task wrote, in order, wherever they are.
"""

import asyncio
import collections
import logging
import time
from typing import Iterable, Iterator, Optional, Tuple

import gevent
import gevent.event
import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy

from taskman.errors import Unavailable
from taskman.fleet.bridge import BridgeClosed, FleetTimeout
from taskman.fleet.connection import OUTPUT_STREAM, PUBLISH_RETRY_WINDOW, Connection, output_subject
from taskman.output import Chunk
from taskman.output_index import Stream

log = logging.getLogger("taskman.fleet.output")

OFFSET = "Taskman-Offset"
STREAM = "Taskman-Stream"
TIME = "Taskman-Time"
END = "Taskman-End"
WINDOW = 16  # chunks in flight per publisher (64 KiB each: 1 MiB)
ACK_TIMEOUT = 10.0
PUBLISH_ERRORS = (nats.errors.Error, asyncio.TimeoutError, Unavailable)
POLL = 1.0  # how often a waiting follower looks at ``cancelled``
BATCH = 64  # messages per trip across the bridge (64 KiB chunks: 4 MiB)


class _Entry:
    """One chunk handed to the fleet: its message, and its acknowledgement
    once the loop sent it."""

    __slots__ = ("data", "headers", "future")

    def __init__(self, data: bytes, headers: dict):
        self.data = data
        self.headers = headers
        self.future: Optional[asyncio.Future] = None

    @property
    def confirmed(self) -> bool:
        future = self.future
        return (future is not None and future.done() and not future.cancelled()
                and future.exception() is None)


class Publisher:
    """Publishes one task's chunks with up to WINDOW of them unacknowledged
    by the (replicated) stream.

    ``publish`` hands a chunk to the loop without a round trip: a sender on
    the loop publishes what is queued, in order, and the acknowledgements
    (on the loop) drop the confirmed chunks. The publishing greenlet waits
    only when WINDOW chunks are unacknowledged, until half are, so the loop
    and the greenlet wake once per burst of chunks, not once per chunk.

    If a publish fails or no acknowledgement comes for ACK_TIMEOUT (a stream
    leader being elected), every chunk not yet acknowledged is published
    again, in order, one at a time, with its own message id, retried for
    PUBLISH_RETRY_WINDOW: the stream stores each id once, so nothing is lost
    or repeated; one that was lost while a later one was stored comes after
    it, which the follower puts back in order.
    """

    def __init__(self, connection: Connection, task_id: str, published: int = 0):
        self.connection = connection
        self.task_id = task_id
        self.subject = output_subject(task_id)
        self.published = published  # bytes handed to the fleet
        # Both touched by this greenlet and the loop's greenlet: one thread,
        # so each change between two switches is whole.
        self._unconfirmed: collections.deque = collections.deque()  # of _Entry, in order
        self._outbox: collections.deque = collections.deque()  # not sent yet
        self._sending = False  # a sender is queued or running on the loop
        self._failure: Optional[BaseException] = None
        self._generation = 0  # a republish starts a new one: older failures are stale
        self._progress = gevent.event.Event()  # down to _wake_at unacknowledged, or a failure
        self._wake_at = 0

    def publish(self, chunk: Chunk) -> None:
        headers = {OFFSET: str(chunk.offset), STREAM: str(int(chunk.stream)),
                   TIME: str(chunk.time_ns), "Nats-Msg-Id": f"{self.task_id}:{chunk.offset}"}
        entry = _Entry(bytes(chunk.data), headers)
        self._unconfirmed.append(entry)
        self._outbox.append(entry)
        self.published = chunk.offset + len(chunk.data)
        if not self._sending:
            self._sending = True
            try:
                self.connection.bridge.post(self._send(self._generation))
            except Unavailable:  # the loop is gone: published one by one (or raising) below
                self._sending = False
                self._failure = BridgeClosed("the fleet connection's event loop stopped")
        if len(self._unconfirmed) >= WINDOW:
            # Down to half before going on: the chunks that follow go over
            # in a burst, one wake-up of the loop (and of this greenlet) for
            # many chunks instead of one each.
            self._settle(WINDOW // 2)

    async def _send(self, generation: int) -> None:
        """On the loop: publish every queued chunk, in order, without waiting
        for acknowledgements."""
        jetstream = self.connection.jetstream
        try:
            while self._outbox and generation == self._generation:
                entry = self._outbox.popleft()
                try:
                    entry.future = await jetstream.publish_async(
                        self.subject, entry.data, headers=dict(entry.headers),
                        stream=OUTPUT_STREAM)
                except PUBLISH_ERRORS as error:
                    self._failed(generation, error)
                    return
                entry.future.add_done_callback(
                    lambda future, generation=generation: self._acknowledged(generation, future))
        finally:
            if generation == self._generation:
                self._sending = False

    def _acknowledged(self, generation: int, future: "asyncio.Future") -> None:
        """On the loop: drop the confirmed chunks at the front; wake the publisher."""
        if future.cancelled() or future.exception() is not None:
            self._failed(generation, future.exception() if not future.cancelled()
                         else asyncio.CancelledError())
            return
        while self._unconfirmed and self._unconfirmed[0].confirmed:
            self._unconfirmed.popleft()
        if len(self._unconfirmed) <= self._wake_at:
            self._progress.set()

    def _failed(self, generation: int, error: BaseException) -> None:
        if generation == self._generation and self._failure is None:
            self._failure = error
        self._progress.set()

    def _settle(self, most: int) -> None:
        """Wait until at most ``most`` chunks are unacknowledged; on a
        failure, or no acknowledgement for ACK_TIMEOUT, publish them again."""
        self._wake_at = most
        while len(self._unconfirmed) > most and self._failure is None:
            self._progress.clear()
            if not self._progress.wait(ACK_TIMEOUT):
                self._failure = FleetTimeout(f"no acknowledgement within {ACK_TIMEOUT:g} s")
        if self._failure is not None:
            log.warning("output of task %s: publish failed (%r): publishing the last %d "
                        "chunk(s) again", self.task_id, self._failure, len(self._unconfirmed))
            self._republish()

    def flush(self) -> None:
        """Wait until every chunk handed over is acknowledged (or republished)."""
        self._settle(0)

    def _republish(self) -> None:
        self._generation += 1  # the sender stops; late acknowledgements change nothing
        self._sending = False
        self._failure = None
        self._outbox.clear()
        entries = list(self._unconfirmed)
        self._unconfirmed.clear()
        for entry in entries:
            _quiet(entry.future)
            self._publish(entry.data, entry.headers)

    def finish(self) -> None:
        """Everything acknowledged, then the end marker: followers stop after it."""
        self.flush()
        self._publish(b"", {END: str(self.published), "Nats-Msg-Id": f"{self.task_id}:end"})

    def pump(self, chunks: Iterable[Chunk]) -> int:
        """Publish every chunk, then the end marker; return the bytes sent."""
        for chunk in chunks:
            self.publish(chunk)
        self.finish()
        return self.published

    def _publish(self, data: bytes, headers: dict) -> None:
        """One publish, acknowledged, retried through a leader election."""
        jetstream = self.connection.jetstream
        deadline = time.monotonic() + PUBLISH_RETRY_WINDOW
        while True:
            try:
                self.connection.call(jetstream.publish(self.subject, data, headers=dict(headers),
                                                       stream=OUTPUT_STREAM), ACK_TIMEOUT)
                return
            except PUBLISH_ERRORS as error:
                if time.monotonic() > deadline:
                    raise Unavailable(f"the fleet did not store output of task "
                                      f"{self.task_id}: {error!r}") from error
                gevent.sleep(0.25)


def follow(connection: Connection, task_id: str, offset: int = 0,
           cancelled: Optional[gevent.event.Event] = None,
           live: bool = True) -> Iterator[Chunk]:
    """Chunks of the task's combined output from ``offset``, live until the
    end marker (``live=False``: only what is stored now). Ends early, with
    no error, when ``cancelled`` is set."""
    order = _InOrder()
    subscription = _subscribe(connection, task_id)
    try:
        while not (cancelled is not None and cancelled.is_set()):
            try:
                messages = connection.call(_next_batch(subscription), POLL + 5.0)
            except nats.errors.TimeoutError:
                if not live:
                    return
                continue
            for message in messages:
                headers = message.headers or {}
                if END in headers:
                    if order.held:
                        raise Unavailable(f"the output of task {task_id} in the fleet has a "
                                          f"gap at byte {order.expected}")
                    return
                chunk = Chunk(int(headers[OFFSET]), Stream(int(headers[STREAM])),
                              int(headers[TIME]), message.data)
                for ready in order.take(chunk):
                    if ready.offset + len(ready.data) > offset:
                        if ready.offset < offset:
                            ready = ready._replace(offset=offset,
                                                   data=ready.data[offset - ready.offset:])
                        yield ready
                if not live and message.metadata.num_pending == 0:
                    return
    finally:
        try:
            connection.call(subscription.unsubscribe(), 5.0)
        except Exception as error:  # the connection is going: nothing to free
            log.debug("output: unsubscribe failed: %r", error)


def _subscribe(connection: Connection, task_id: str):
    """The ordered consumer of the task's output, retried through a stream
    leader's election (a NATS node that just died) like a publish is."""
    deadline = time.monotonic() + PUBLISH_RETRY_WINDOW
    while True:
        try:
            return connection.call(connection.jetstream.subscribe(
                output_subject(task_id), ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL, stream=OUTPUT_STREAM), 5.0)
        except PUBLISH_ERRORS as error:
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot follow the output of task {task_id} in the "
                                  f"fleet: {error!r}") from error
            log.info("output of task %s: cannot follow yet (%r): retrying", task_id, error)
            gevent.sleep(0.25)


def _quiet(future) -> None:
    """Mark a publish's failure as seen: it was handled by publishing again."""
    if future is None:
        return
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.add_done_callback(lambda done: done.cancelled() or done.exception())


class _InOrder:
    """Puts chunks back in offset order: a chunk republished after a failed
    publish may be stored after its successors (see Publisher)."""

    MAX_HELD = 1024  # chunks; far more than a publisher has in flight

    def __init__(self):
        self.expected = 0
        self.held: dict = {}

    def take(self, chunk: Chunk) -> list:
        """The chunks now ready, in order (none if ``chunk`` came early)."""
        if chunk.offset < self.expected:
            return []  # stored twice: seen already
        if chunk.offset > self.expected:
            if len(self.held) >= self.MAX_HELD:
                raise Unavailable(f"output in the fleet has a gap at byte {self.expected}")
            self.held[chunk.offset] = chunk
            return []
        ready = [chunk]
        self.expected += len(chunk.data)
        while self.expected in self.held:
            following = self.held.pop(self.expected)
            ready.append(following)
            self.expected += len(following.data)
        return ready


async def _next_batch(subscription) -> list:
    """The next message (waiting up to POLL), and those already buffered
    behind it: one trip across the bridge for many messages."""
    batch = [await subscription.next_msg(timeout=POLL)]
    while subscription.pending_msgs > 0 and len(batch) < BATCH:
        batch.append(await subscription.next_msg(timeout=POLL))
    return batch


def stored_end(connection: Connection, task_id: str) -> Tuple[int, bool]:
    """(where the output stored for the task ends, whether its end marker is
    stored): where a host that re-adopts a task goes on publishing."""
    try:
        message = connection.call(connection.jetstream.get_last_msg(
            OUTPUT_STREAM, output_subject(task_id)))
    except nats.js.errors.NotFoundError:
        return 0, False
    headers = message.headers or {}
    if END in headers:
        return int(headers[END]), True
    return int(headers[OFFSET]) + len(message.data or b""), False


def forget(connection: Connection, task_id: str) -> None:
    """Remove a task's output from the fleet (retention)."""
    connection.call(connection.jetstream.purge_stream(OUTPUT_STREAM,
                                                       subject=output_subject(task_id)))
