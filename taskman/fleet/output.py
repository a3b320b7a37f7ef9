"""A task's output in the fleet: its host publishes, any replica follows.

The host pumps the task's local output log, chunk by chunk, to the task's own
subject in the file-backed output stream, each message labelled with the
chunk's offset, stream and read time; a last, empty message marks the end.
A follower on any replica replays the subject from its first message with an
ordered consumer (gaps are re-fetched by the client, never skipped) and
follows it live until that end marker, so followers see the very bytes the
task wrote, in order, wherever they are.
"""

import logging
import time
from typing import Iterable, Iterator, Optional

import gevent
import gevent.event
import nats.errors
from nats.js.api import DeliverPolicy
from nats.js.errors import NoStreamResponseError

from taskman.errors import Unavailable
from taskman.fleet.connection import OUTPUT_STREAM, PUBLISH_RETRY_WINDOW, Connection, output_subject
from taskman.output import Chunk
from taskman.output_index import Stream

log = logging.getLogger("taskman.fleet.output")

OFFSET = "Taskman-Offset"
STREAM = "Taskman-Stream"
TIME = "Taskman-Time"
END = "Taskman-End"
POLL = 1.0  # how often a waiting follower looks at ``cancelled``
BATCH = 64  # messages per trip across the bridge (64 KiB chunks: 4 MiB)


class Publisher:
    """Publishes one task's chunks; every publish is acknowledged by the
    stream (replicated) before the next, and retried with the same message
    id while a stream leader is being elected (no loss, no duplicate)."""

    def __init__(self, connection: Connection, task_id: str):
        self.connection = connection
        self.task_id = task_id
        self.subject = output_subject(task_id)
        self.published = 0  # bytes

    def publish(self, chunk: Chunk) -> None:
        headers = {OFFSET: str(chunk.offset), STREAM: str(int(chunk.stream)),
                   TIME: str(chunk.time_ns), "Nats-Msg-Id": f"{self.task_id}:{chunk.offset}"}
        self._publish(bytes(chunk.data), headers)
        self.published = chunk.offset + len(chunk.data)

    def finish(self) -> None:
        """The end marker: followers stop after it."""
        self._publish(b"", {END: str(self.published),
                            "Nats-Msg-Id": f"{self.task_id}:end"})

    def pump(self, chunks: Iterable[Chunk]) -> int:
        """Publish every chunk, then the end marker; return the bytes sent."""
        for chunk in chunks:
            self.publish(chunk)
        self.finish()
        return self.published

    def _publish(self, data: bytes, headers: dict) -> None:
        jetstream = self.connection.jetstream
        deadline = time.monotonic() + PUBLISH_RETRY_WINDOW
        while True:
            try:
                self.connection.call(jetstream.publish(self.subject, data, headers=headers,
                                                       stream=OUTPUT_STREAM), 10.0)
                return
            except (NoStreamResponseError, nats.errors.TimeoutError, Unavailable) as error:
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
    subscription = connection.call(connection.jetstream.subscribe(
        output_subject(task_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
        stream=OUTPUT_STREAM))
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
                    return
                chunk = Chunk(int(headers[OFFSET]), Stream(int(headers[STREAM])),
                              int(headers[TIME]), message.data)
                if chunk.offset + len(chunk.data) > offset:
                    if chunk.offset < offset:
                        chunk = chunk._replace(offset=offset,
                                               data=chunk.data[offset - chunk.offset:])
                    yield chunk
                if not live and message.metadata.num_pending == 0:
                    return
    finally:
        try:
            connection.call(subscription.unsubscribe(), 5.0)
        except Exception as error:  # the connection is going: nothing to free
            log.debug("output: unsubscribe failed: %r", error)


async def _next_batch(subscription) -> list:
    """The next message (waiting up to POLL), and those already buffered
    behind it: one trip across the bridge for many messages."""
    batch = [await subscription.next_msg(timeout=POLL)]
    while subscription.pending_msgs > 0 and len(batch) < BATCH:
        batch.append(await subscription.next_msg(timeout=POLL))
    return batch


def forget(connection: Connection, task_id: str) -> None:
    """Remove a task's output from the fleet (retention)."""
    connection.call(connection.jetstream.purge_stream(OUTPUT_STREAM,
                                                       subject=output_subject(task_id)))
