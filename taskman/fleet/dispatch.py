"""Dispatch: a start offered on any replica is claimed by one host with room.

The replica publishes the whole record (phase ``pending``) to the dispatch
work-queue stream, with the subject of an inbox it listens on. Every host
pulls from one shared durable consumer, and only while it has capacity, so
placement follows free room. A host claims by *creating* the record in the
tasks bucket (``claimed``, its name as host): creation is a compare-and-swap
on "no such key", so a redelivered or duplicated message finds the record
there and is dropped, and a start never runs twice. The host starts the
task, answers the replica's inbox at once (core NATS: no replicated write on
the way), then records ``running`` with the pid and acks the message.

The replica waits, bounded, for that answer (looking at the bucket now and
then, should the answer be lost); if none came, it creates the record itself
as ``refused``, and a host that claims later loses that race. Until a host
answers, the task has no record: nobody holds its id yet.
"""

import logging
import time
from typing import Callable, Optional

import gevent
import gevent.event
import nats.errors
import nats.js.api
from nats.js.errors import FetchTimeoutError, KeyWrongLastSequenceError

from taskman.errors import NotFound, ResourceExhausted, TaskmanError, Unavailable
from taskman.fleet.connection import DISPATCH_STREAM, DISPATCH_SUBJECT, Connection
from taskman.fleet.records import CLAIMED, REFUSED, RUNNING, Conflict, Record, Records

log = logging.getLogger("taskman.fleet.dispatch")

WORKERS = "taskman-workers"  # the one durable consumer every host pulls from
ACK_WAIT = 30.0  # a claimed message not acked by then is delivered again
PLACEMENT_TIMEOUT = 10.0  # how long a start waits for some host to claim it
REPLY = "Taskman-Reply"  # header: the replica's inbox for the host's answer
LOOK = 1.0  # how often a waiting replica reads the bucket (a lost answer)
EXPIRES = "Taskman-Expires"  # header: when the replica stops waiting (seconds, epoch)
CLOCK_SLACK = 2.0  # hosts' clocks may differ this much from the replica's
# An offer a host lacks the labels for goes back to the queue, to be offered
# again this much later: longer than the host's next pull, since NATS gives
# redeliveries before new messages (a shorter delay starved the queue).
PASS_DELAY = 0.25


def has_labels(host_labels: dict, wanted: dict) -> bool:
    """True if a host with ``host_labels`` may run a start requiring ``wanted``."""
    return all(host_labels.get(key) == value for key, value in wanted.items())


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
    subscription, answer = connection.call(
        _offer(connection, record, record.requested_time + timeout, min(timeout, LOOK)),
        timeout + 5.0)
    try:
        while answer is None and time.monotonic() < deadline:
            try:
                found, _ = records.get(record.id)
                return _outcome(found)
            except NotFound:  # not claimed yet (or its answer is on the way)
                pass
            wait = max(0.0, min(LOOK, deadline - time.monotonic()))
            answer = connection.call(_answer(subscription, wait), wait + 5.0)
    finally:
        if answer is None:
            connection.call(_quietly_unsubscribe(subscription), 5.0)
    if answer is not None:
        return _outcome(Record.decode(answer))
    record.phase = REFUSED
    record.error = f"no host in the fleet had room for the task within {timeout:g} s"
    record.error_kind = ResourceExhausted.__name__
    try:
        records.create(record)
    except Conflict:  # a host claimed it just now: it has it
        return _outcome(records.get(record.id)[0])
    raise rebuild_error(record)


async def _offer(connection: Connection, record: Record, expires: float, wait: float):
    """Listen, publish the offer, wait up to ``wait`` for a host's answer:
    (the inbox subscription, the answer's bytes or None). One trip across
    the bridge; the publish's acknowledgement and the host's work overlap."""
    client = connection.client
    inbox = client.new_inbox()
    subscription = await client.subscribe(inbox)  # before the offer: the server keeps order
    try:
        await connection.jetstream.publish(
            f"{DISPATCH_SUBJECT}.{record.id}", record.encode(),
            headers={"Nats-Msg-Id": f"start-{record.id}", REPLY: inbox,
                     EXPIRES: f"{expires:.3f}"})
    except BaseException:
        await _quietly_unsubscribe(subscription)
        raise
    return subscription, await _answer(subscription, wait)


async def _answer(subscription, wait: float) -> Optional[bytes]:
    """The host's answer, if it comes within ``wait`` (the inbox is then
    closed: one answer per offer)."""
    try:
        message = await subscription.next_msg(timeout=wait)
    except nats.errors.TimeoutError:
        return None
    await _quietly_unsubscribe(subscription)
    return message.data


async def _quietly_unsubscribe(subscription) -> None:
    try:
        await subscription.unsubscribe()
    except nats.errors.Error:  # the connection is closing: nothing to free
        pass


def _outcome(record: Record) -> Record:
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


class Claimer:
    """A host's half: pull starts while there is room, claim, run, answer.

    ``run(record)`` starts the task locally (under the record's id) and
    returns its pid, raising a TaskmanError if it cannot (the record is then
    ``refused`` with it). ``room()`` says how many more tasks this host
    takes now. An offer requiring labels this host lacks (the connection's
    settings) goes back to the queue for another host.
    """

    def __init__(self, connection: Connection, records: Records,
                 run: Callable[[Record], int], room: Callable[[], int]):
        self.connection = connection
        self.records = records
        self.node = connection.settings.node
        self.labels = dict(connection.settings.labels)
        self.run = run
        self.room = room
        self._subscription = None
        self._stopped = gevent.event.Event()
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self) -> "Claimer":
        jetstream = self.connection.jetstream
        self._subscription = self.connection.call(jetstream.pull_subscribe(
            f"{DISPATCH_SUBJECT}.>", durable=WORKERS, stream=DISPATCH_STREAM,
            config=nats.js.api.ConsumerConfig(ack_wait=ACK_WAIT, max_ack_pending=-1)))
        self._greenlet = gevent.spawn(self._pull)
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._greenlet is not None:
            self._greenlet.kill(timeout=5)

    def _pull(self) -> None:
        while not self._stopped.is_set():
            if self.room() <= 0:
                self._stopped.wait(0.05)
                continue
            try:
                claims = self.connection.call(self._fetch_and_claim(), 10.0)
            except (FetchTimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as error:  # the fleet is away: keep trying, say so
                log.warning("dispatch: fetch failed: %r", error)
                self._stopped.wait(0.5)
                continue
            for record, revision, message in claims:
                self._run_claimed(record, revision, message)

    async def _fetch_and_claim(self) -> list:
        """Pull an offer and claim it in the same trip to the loop: [(record,
        its revision, the message)] for the offers this host won."""
        won = []
        for message in await self._subscription.fetch(1, timeout=1.0):
            try:
                record = Record.decode(message.data)
            except (ValueError, TypeError) as error:  # not an offer: drop it
                log.warning("dispatch: dropped a malformed offer: %r", error)
                await message.ack()
                continue
            expires = float((message.headers or {}).get(EXPIRES) or 0)
            if expires and time.time() > expires + CLOCK_SLACK:  # refused by now
                await message.ack()
                continue
            if not has_labels(self.labels, record.labels):
                await message.nak(delay=PASS_DELAY)
                continue
            record.phase = CLAIMED
            record.host = self.node
            try:
                revision = await self.records.connection.tasks.create(record.id, record.encode())
            except KeyWrongLastSequenceError:  # somebody's already (a duplicate, a late claim)
                await message.ack()
                continue
            except Exception as error:  # the bucket did not answer: redelivery retries
                log.warning("dispatch: task %s not claimed: %r", record.id, error)
                continue
            won.append((record, revision, message))
        return won

    def claim(self, record: Record, message=None) -> bool:
        """Take the offered task unless some host (or the replica's
        refusal) has its record already, run it, answer, record the outcome.
        Returns True if this host ran it."""
        record.phase = CLAIMED
        record.host = self.node
        try:
            revision = self.records.create(record)
        except Conflict:  # somebody's already (a duplicate, a late claim)
            self._ack(message)
            return False
        return self._run_claimed(record, revision, message)

    def _run_claimed(self, record: Record, revision: int, message) -> bool:
        """Run a task this host claimed, answer the replica, then (on the
        loop, not waited for: the next offer is pulled meanwhile) record
        ``running`` and ack the offer."""
        reply = (message.headers or {}).get(REPLY) if message is not None else None
        try:
            record.pid = self.run(record)
        except TaskmanError as error:
            record.phase = REFUSED
            record.error = str(error)
            record.error_kind = type(error).__name__
            self._settle(record, revision)  # before the answer: the refusal is final
            self._answer(reply, record)
            self._ack(message)
            return False
        record.phase = RUNNING
        record.start_time = time.time()
        try:
            self.connection.bridge.post(self._answer_and_settle(reply, record, revision, message))
        except TaskmanError as error:  # the loop is gone: the claim stays, the host answers
            log.warning("dispatch: task %s: could not answer: %s", record.id, error)
        return True

    async def _answer_and_settle(self, reply: Optional[str], record: Record, revision: int,
                                 message) -> None:
        data = record.encode()
        if reply:
            await self.connection.client.publish(reply, data)
        try:
            await self.connection.tasks.update(record.id, data, revision)
        except KeyWrongLastSequenceError:  # ended already, or taken as lost: see _settle
            gevent.spawn(self._settle, record, revision)
        except Exception as error:  # the fleet is away: the record stays claimed
            log.warning("dispatch: could not record task %s running: %r", record.id, error)
        if message is not None:
            await message.ack()

    def _answer(self, reply: Optional[str], record: Record) -> None:
        if not reply:
            return
        try:
            self.connection.call(self.connection.client.publish(reply, record.encode()), 5.0)
        except Exception as error:  # the replica reads the bucket instead
            log.warning("dispatch: could not answer for task %s: %r", record.id, error)

    def _settle(self, settled: Record, revision: int) -> None:
        """Write the claim's outcome over the claim (CAS on its revision); if
        the record moved meanwhile (a very short task already ended, or it
        was taken as lost), only a claim still ours is changed."""
        try:
            self.records.update(settled, revision)
            return
        except Conflict:
            pass
        except TaskmanError as error:
            log.warning("dispatch: could not record task %s %s: %s", settled.id,
                        settled.phase, error)
            return

        def settle(record: Record) -> bool:
            if record.phase != CLAIMED or record.host != self.node:
                return False
            record.phase = settled.phase
            record.pid = settled.pid
            record.start_time = settled.start_time
            record.error = settled.error
            record.error_kind = settled.error_kind
            return True

        try:
            self.records.modify(settled.id, settle)
        except TaskmanError as error:
            log.warning("dispatch: could not record task %s %s: %s", settled.id,
                        settled.phase, error)

    def _ack(self, message) -> None:
        if message is not None:
            try:
                self.connection.call(message.ack(), 5.0)
            except Exception as error:  # redelivery then finds the record claimed
                log.warning("dispatch: ack failed: %r", error)
