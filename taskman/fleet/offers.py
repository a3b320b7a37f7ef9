"""Offers: the replica's half of dispatch (taskman.fleet.dispatch has the hosts').

The replica offers a new task's whole record straight to one host (core
NATS, the hosts' queue group), then, on a pass or no answer within
DIRECT_WAIT, through the dispatch work queue; it waits, bounded, for the
claiming host's answer on an inbox of its own, and records the start as
``refused`` itself if none came. The headers below are the offer's and the
answer's format, which both halves share.
"""

import time
from typing import Optional

import nats.errors

from taskman.errors import NotFound, ResourceExhausted, TaskmanError, Unavailable
from taskman.fleet.connection import DISPATCH_SUBJECT, OFFER_SUBJECT, Connection
from taskman.fleet.records import REFUSED, Conflict, Record, Records

PLACEMENT_TIMEOUT = 10.0  # how long a start waits for some host to claim it
REPLY = "Taskman-Reply"  # header: the replica's inbox for the host's answer
LOOK = 1.0  # how often a waiting replica reads the bucket (a lost answer)
EXPIRES = "Taskman-Expires"  # header: when the replica stops waiting (seconds, epoch)
PASS = "Taskman-Pass"  # header of a host's answer to a direct offer it cannot take
STATUS = "Status"  # header of NATS's own answers (503: no host listens)
# How long a replica waits for a direct offer's answer before queueing the
# offer: a host that claimed it may still answer later, to the same inbox.
DIRECT_WAIT = 0.5


def place(records: Records, record: Record, timeout: float = PLACEMENT_TIMEOUT) -> Record:
    """Offer a new task to the hosts and wait until one took it (the
    replica's half); return its record as the host answered.

    Raises the host's own error if it refused the start (an unknown command,
    say), ResourceExhausted if no host with room claimed it within
    ``timeout`` (the record is then ``refused``, for good).
    """
    record.requested_time = time.time()
    connection = records.connection
    deadline = time.monotonic() + timeout
    expires = record.requested_time + timeout
    subscription, answer = connection.call(
        _offer_directly(connection, record, expires, min(timeout, DIRECT_WAIT)), timeout + 5.0)
    try:
        if answer is None:  # no host took it at once: through the queue, to wait for room
            answer = connection.call(
                _offer(connection, subscription, record, expires, min(timeout, LOOK)), timeout + 5.0)
        while answer is None and time.monotonic() < deadline:
            try:
                found, _ = records.get(record.id)
                return outcome(found)
            except NotFound:  # not claimed yet (or its answer is on the way)
                pass
            wait = max(0.0, min(LOOK, deadline - time.monotonic()))
            answer = connection.call(_answer(subscription, wait), wait + 5.0)
    finally:
        if answer is None:
            connection.call(_quietly_unsubscribe(subscription), 5.0)
    if answer is not None:
        return outcome(Record.decode(answer))
    record.phase = REFUSED
    record.error = f"no host in the fleet had room for the task within {timeout:g} s"
    record.error_kind = ResourceExhausted.__name__
    try:
        records.create(record)
    except Conflict:  # a host claimed it just now: it has it
        return outcome(records.get(record.id)[0])
    raise rebuild_error(record)


async def _offer_directly(connection: Connection, record: Record, expires: float, wait: float):
    """Listen, offer the start to one host, wait up to ``wait`` for its
    answer: (the inbox subscription, the answer's bytes or None). One trip
    across the bridge, no replicated write."""
    client = connection.client
    subscription = await client.subscribe(client.new_inbox())
    try:
        await client.publish(OFFER_SUBJECT, record.encode(), reply=subscription.subject,
                             headers={EXPIRES: f"{expires:.3f}"})
    except BaseException:
        await _quietly_unsubscribe(subscription)
        raise
    return subscription, await _answer(subscription, wait)


async def _offer(connection: Connection, subscription, record: Record, expires: float,
                 wait: float) -> Optional[bytes]:
    """Publish the offer to the work queue (answers go to ``subscription``'s
    inbox), wait up to ``wait`` for a host's answer. The publish's
    acknowledgement and the host's work overlap."""
    await connection.jetstream.publish(
        f"{DISPATCH_SUBJECT}.{record.id}", record.encode(),
        headers={"Nats-Msg-Id": f"start-{record.id}", REPLY: subscription.subject,
                 EXPIRES: f"{expires:.3f}"})
    return await _answer(subscription, wait)


async def _answer(subscription, wait: float) -> Optional[bytes]:
    """The host's answer, if it comes within ``wait`` (the inbox is then
    closed: one answer per offer); None for a pass or NATS's "no host
    listens", which end the wait early."""
    try:
        message = await subscription.next_msg(timeout=wait)
    except nats.errors.TimeoutError:
        return None
    headers = message.headers or {}
    if PASS in headers or STATUS in headers:
        return None
    await _quietly_unsubscribe(subscription)
    return message.data


async def _quietly_unsubscribe(subscription) -> None:
    try:
        await subscription.unsubscribe()
    except nats.errors.Error:  # the connection is closing: nothing to free
        pass


def outcome(record: Record) -> Record:
    if record.phase == REFUSED:
        raise rebuild_error(record)
    return record


def rebuild_error(record: Record) -> TaskmanError:
    """The TaskmanError a host reported for a refused start, by class name."""
    import taskman.errors as errors

    kind = getattr(errors, record.error_kind, None)
    if not (isinstance(kind, type) and issubclass(kind, TaskmanError)):
        kind = Unavailable
    return kind(record.error)
