"""Dispatch: a start recorded on any replica is claimed by one host with room.

The replica stores the record (phase ``pending``) and publishes the task id
to the dispatch work-queue stream. Every host pulls from one shared durable
consumer, and only while it has capacity, so placement follows free room.
A host claims by compare-and-swap ``pending -> claimed`` on the record:
a redelivered or duplicated message finds the record already claimed and is
dropped, so a start never runs twice. The replica waits (bounded) for the
record to leave ``pending``; if none did, it CASes ``pending -> refused``, and
a host that claims later loses that race.
"""

import logging
import time
from typing import Callable, Optional

import gevent
import gevent.event
import nats.errors
import nats.js.api
from nats.js.errors import FetchTimeoutError

from taskman.errors import ResourceExhausted, TaskmanError, Unavailable
from taskman.fleet.connection import DISPATCH_STREAM, DISPATCH_SUBJECT, Connection
from taskman.fleet.records import CLAIMED, PENDING, REFUSED, RUNNING, Conflict, Record, Records

log = logging.getLogger("taskman.fleet.dispatch")

WORKERS = "taskman-workers"  # the one durable consumer every host pulls from
ACK_WAIT = 30.0  # a claimed message not acked by then is delivered again
PLACEMENT_TIMEOUT = 10.0  # how long a start waits for some host to claim it


def submit(records: Records, record: Record) -> None:
    """Record a new task and offer it to the hosts (the replica's half)."""
    record.requested_time = time.time()
    records.create(record)
    connection = records.connection
    connection.call(connection.jetstream.publish(
        f"{DISPATCH_SUBJECT}.{record.id}", record.id.encode(),
        headers={"Nats-Msg-Id": f"start-{record.id}"}))


def wait_placed(records: Records, task_id: str, timeout: float = PLACEMENT_TIMEOUT) -> Record:
    """Wait until a host took the task; return its record.

    Raises the host's own error if it refused the start (an unknown command,
    say), ResourceExhausted if no host with room claimed it within
    ``timeout`` (the record is then ``refused``, for good).
    """
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        record, _ = records.get(task_id)
        if record.phase == REFUSED:
            raise rebuild_error(record)
        if record.phase not in (PENDING, CLAIMED):
            return record
        if time.monotonic() >= deadline:
            break
        gevent.sleep(pause)
        pause = min(pause * 2, 0.01)  # a start is placed in tens of ms: look often

    def refuse(record: Record) -> bool:
        if record.phase != PENDING:
            return False
        record.phase = REFUSED
        record.error = f"no host in the fleet had room for the task within {timeout:g} s"
        record.error_kind = ResourceExhausted.__name__
        return True

    record, _ = records.modify(task_id, refuse)
    if record.phase == REFUSED:
        raise rebuild_error(record)
    return record  # claimed: a host has it (and answers for it, or is found lost)


def rebuild_error(record: Record) -> TaskmanError:
    """The TaskmanError a host reported for a refused start, by class name."""
    import taskman.errors as errors

    kind = getattr(errors, record.error_kind, None)
    if not (isinstance(kind, type) and issubclass(kind, TaskmanError)):
        kind = Unavailable
    return kind(record.error)


class Claimer:
    """A host's half: pull starts while there is room, claim, run, report.

    ``run(record)`` starts the task locally and returns its pid (setting
    ``record.local_id`` to the host's own id for it, if it has one), raising
    a TaskmanError if it cannot (the record is then ``refused`` with it).
    ``room()`` says how many more tasks this host takes now.
    """

    def __init__(self, connection: Connection, records: Records,
                 run: Callable[[Record], int], room: Callable[[], int]):
        self.connection = connection
        self.records = records
        self.node = connection.settings.node
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
                messages = self.connection.call(self._subscription.fetch(1, timeout=1.0), 5.0)
            except (FetchTimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as error:  # the fleet is away: keep trying, say so
                log.warning("dispatch: fetch failed: %r", error)
                self._stopped.wait(0.5)
                continue
            for message in messages:
                self.claim(message.data.decode(), message)

    def claim(self, task_id: str, message=None) -> bool:
        """Take the task if it is still pending, run it, record the outcome.

        Returns True if this host ran it. The message is acked in every
        case: a start that lost the CAS is somebody else's (or refused).
        """
        def take(record: Record) -> bool:
            if record.phase != PENDING:
                return False
            record.phase = CLAIMED
            record.host = self.node
            return True

        try:
            record, claimed = self.records.modify(task_id, take)
        except TaskmanError as error:  # gone (NotFound) or contended: not ours
            log.info("dispatch: task %s not claimed: %s", task_id, error)
            claimed = False
        if not claimed:
            self._ack(message)
            return False
        try:
            pid = self.run(record)
        except TaskmanError as error:
            self._settle(task_id, REFUSED, error=error)
            self._ack(message)
            return False
        self._settle(task_id, RUNNING, pid=pid, local_id=record.local_id)
        self._ack(message)
        return True

    def _settle(self, task_id: str, phase: str, pid: int = 0, local_id: str = "",
                error: Optional[TaskmanError] = None) -> None:
        def settle(record: Record) -> bool:
            if record.phase != CLAIMED or record.host != self.node:
                return False  # already ended (a very short task) or taken as lost
            record.phase = phase
            record.pid = pid
            record.local_id = local_id
            if phase == RUNNING:
                record.start_time = time.time()
            if error is not None:
                record.error = str(error)
                record.error_kind = type(error).__name__
            return True

        try:
            self.records.modify(task_id, settle)
        except Conflict:
            log.warning("dispatch: could not record %s for task %s", phase, task_id)

    def _ack(self, message) -> None:
        if message is not None:
            try:
                self.connection.call(message.ack_sync(), 5.0)
            except Exception as error:  # redelivery then finds the record claimed
                log.warning("dispatch: ack failed: %r", error)
