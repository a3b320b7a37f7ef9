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


class Publisher:
    """Publishes one task's chunks, WINDOW of them in flight before waiting
    for the oldest's acknowledgement by the (replicated) stream.

    If a publish fails (a stream leader being elected), every chunk not yet
    acknowledged is published again, in order, one at a time, with its own
    message id, retried for PUBLISH_RETRY_WINDOW: the stream stores each id
    once, so nothing is lost or repeated; one that was lost while a later
    one was stored comes after it, which the follower puts back in order.
    """

    def __init__(self, connection: Connection, task_id: str, published: int = 0):
        self.connection = connection
        self.task_id = task_id
        self.subject = output_subject(task_id)
        self.published = published  # bytes handed to the fleet
        self._unconfirmed: collections.deque = collections.deque()  # [data, headers, future]

    def publish(self, chunk: Chunk) -> None:
        headers = {OFFSET: str(chunk.offset), STREAM: str(int(chunk.stream)),
                   TIME: str(chunk.time_ns), "Nats-Msg-Id": f"{self.task_id}:{chunk.offset}"}
        entry = [bytes(chunk.data), headers, None]
        oldest = self._unconfirmed[0][2] if len(self._unconfirmed) >= WINDOW else None
        self._unconfirmed.append(entry)
        self.published = chunk.offset + len(chunk.data)
        try:
            entry[2] = self.connection.call(self._send(entry[0], headers, oldest), ACK_TIMEOUT + 5)
        except PUBLISH_ERRORS as error:
            log.warning("output of task %s: publish failed (%r): publishing the last %d "
                        "chunk(s) again", self.task_id, error, len(self._unconfirmed))
            self._republish()
            return
        if oldest is not None:
            self._unconfirmed.popleft()

    async def _send(self, data: bytes, headers: dict, oldest) -> "asyncio.Future":
        if oldest is not None:  # shielded: a timeout here must not cancel the ack
            await asyncio.wait_for(asyncio.shield(oldest), ACK_TIMEOUT)
        return await self.connection.jetstream.publish_async(
            self.subject, data, headers=dict(headers), stream=OUTPUT_STREAM)

    def flush(self) -> None:
        """Wait until every chunk handed over is acknowledged (or republished)."""
        futures = [entry[2] for entry in self._unconfirmed if entry[2] is not None]

        async def settle():
            return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                          ACK_TIMEOUT)

        try:
            results = self.connection.call(settle(), ACK_TIMEOUT + 5) if futures else []
            failed = len(futures) != len(self._unconfirmed) or any(
                isinstance(result, BaseException) for result in results)
        except PUBLISH_ERRORS:
            failed = True
        if failed:
            self._republish()
        self._unconfirmed.clear()

    def _republish(self) -> None:
        for data, headers, future in list(self._unconfirmed):
            _quiet(future)
            self._publish(data, headers)
        self._unconfirmed.clear()

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
