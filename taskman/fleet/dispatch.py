"""Dispatch: a start offered on any replica is claimed by one host with room.

The replica first offers the whole record (phase ``pending``) straight to
one host, a core NATS message to the hosts' queue group, with the subject of
an inbox it listens on. A host with room and the labels claims by *creating*
the record in the tasks bucket (``claimed``, its name as host): creation is a
compare-and-swap on "no such key", so a duplicate or late offer finds the
record there and is dropped, and a start never runs twice. The host starts
the task, answers the replica's inbox at once (core NATS: no replicated write
on the way), then records ``running`` with the pid. A host without room or
the labels answers "pass".

On a pass, or no answer within DIRECT_WAIT, the replica publishes the offer
to the dispatch work-queue stream (durable, replicated), with the same
inbox. Every host pulls from one shared durable consumer, and only while it
has room, so such an offer waits for free room; the host claims it the same
way and acks the message after answering.

A replica whose own host (the same server, the same connection) has room
and is among the least loaded live hosts skips the offer: it claims with the
same create and runs the start there (``claim_here``), so no message crosses
the fleet on the way but the claim's replicated write.

The replica waits, bounded, for an answer (looking at the bucket now and
then, should the answer be lost); if none came, it creates the record itself
as ``refused``, and a host that claims later loses that race. Until a host
answers, the task has no record: nobody holds its id yet. The direct offer
saves the work queue's replicated write and ack on the way of most starts;
the queue remains for the starts no host could take at once.

This module is the hosts' half (``Claimer``); the replica's is
taskman.fleet.offers.
"""

import logging
import time
from typing import Callable, Optional

import gevent
import gevent.event
import nats.errors
import nats.js.api
from nats.js.errors import FetchTimeoutError, KeyWrongLastSequenceError

from taskman.errors import TaskmanError
from taskman.fleet.connection import DISPATCH_STREAM, DISPATCH_SUBJECT, HOSTS_QUEUE, OFFER_SUBJECT, Connection
from taskman.fleet.offers import EXPIRES, PASS, REPLY
from taskman.fleet.records import CLAIMED, REFUSED, RUNNING, Conflict, Record, Records

log = logging.getLogger("taskman.fleet.dispatch")

WORKERS = "taskman-workers"  # the one durable consumer every host pulls from
ACK_WAIT = 30.0  # a claimed message not acked by then is delivered again
CLOCK_SLACK = 2.0  # hosts' clocks may differ this much from the replica's
# An offer a host lacks the labels for goes back to the queue, to be offered
# again this much later: longer than the host's next pull, since NATS gives
# redeliveries before new messages (a shorter delay starved the queue).
PASS_DELAY = 0.25


def has_labels(host_labels: dict, wanted: dict) -> bool:
    """True if a host with ``host_labels`` may run a start requiring ``wanted``."""
    return all(host_labels.get(key) == value for key, value in wanted.items())


class Claimer:
    """A host's half: take direct offers and pull queued ones while there is
    room, claim, run, answer.

    ``run(record)`` starts the task locally (under the record's id) and
    returns its pid, raising a TaskmanError if it cannot (the record is then
    ``refused`` with it). ``room()`` says how many more tasks this host
    takes now; claims not yet running count against it too. An offer
    requiring labels this host lacks (the connection's settings) is passed:
    a direct one back to its replica, a queued one back to the queue.
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
        self._direct = None
        self._claiming = 0  # claimed or being claimed, not yet running (not in room())
        self._stopped = gevent.event.Event()
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self) -> "Claimer":
        jetstream = self.connection.jetstream
        self._subscription = self.connection.call(jetstream.pull_subscribe(
            f"{DISPATCH_SUBJECT}.>", durable=WORKERS, stream=DISPATCH_STREAM,
            config=nats.js.api.ConsumerConfig(ack_wait=ACK_WAIT, max_ack_pending=-1)))
        self._direct = self.connection.call(self.connection.client.subscribe(
            OFFER_SUBJECT, queue=HOSTS_QUEUE, cb=self._offered_directly))
        self._greenlet = gevent.spawn(self._pull)
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._direct is not None:
            try:
                self.connection.call(self._direct.unsubscribe(), 5.0)
            except Exception as error:  # the connection is going anyway
                log.debug("dispatch: unsubscribe failed: %r", error)
        if self._greenlet is not None:
            self._greenlet.kill(timeout=5)

    def free(self) -> int:
        """How many more starts this host takes now (claims in flight count)."""
        return self.room() - self._claiming

    def _pull(self) -> None:
        while not self._stopped.is_set():
            if self.free() <= 0:
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
                try:
                    self._run_claimed(record, revision, message)
                finally:
                    self._claiming -= 1

    async def _claim(self, record: Record) -> Optional[int]:
        """On the loop: create the record as claimed by this host (counted in
        ``_claiming`` until the caller ran it); its revision, or None if
        somebody has it already. Other errors propagate (and free the room)."""
        record.phase = CLAIMED
        record.host = self.node
        self._claiming += 1
        try:
            return await self.connection.tasks.create(record.id, record.encode())
        except KeyWrongLastSequenceError:  # somebody's already (a duplicate, a late claim)
            self._claiming -= 1
            return None
        except BaseException:
            self._claiming -= 1
            raise

    async def _offered_directly(self, message) -> None:
        """On the loop, for each direct offer: claim it and run it in a
        greenlet, or pass (no room, no labels, stopping)."""
        try:
            record = Record.decode(message.data)
        except (ValueError, TypeError) as error:  # not an offer: the replica queues it
            log.warning("dispatch: a malformed direct offer: %r", error)
            return
        if self._stopped.is_set() or self.free() <= 0 or not has_labels(self.labels,
                                                                         record.labels):
            await self._pass(message)
            return
        try:
            revision = await self._claim(record)
        except Exception as error:  # the bucket did not answer: the replica queues it
            log.warning("dispatch: task %s not claimed: %r", record.id, error)
            await self._pass(message)
            return
        if revision is not None:
            gevent.spawn(self._run_direct, record, revision, message.reply)

    async def _pass(self, message) -> None:
        if message.reply:
            await self.connection.client.publish(message.reply, b"", headers={PASS: self.node})

    def _run_direct(self, record: Record, revision: int, reply: str) -> None:
        try:
            self._run_claimed(record, revision, None, reply)
        finally:
            self._claiming -= 1

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
            if not has_labels(self.labels, record.labels) or self.free() <= 0:
                await message.nak(delay=PASS_DELAY)
                continue
            try:
                revision = await self._claim(record)
            except Exception as error:  # the bucket did not answer: redelivery retries
                log.warning("dispatch: task %s not claimed: %r", record.id, error)
                continue
            if revision is None:
                await message.ack()
                continue
            won.append((record, revision, message))
        return won

    def claim_here(self, record: Record, timeout: float) -> Optional[Record]:
        """The replica's shortcut when this host is its own: claim a new
        start here and run it, with no offer and no answer between
        connections. The record as it ran (``running``, pid) or as it was
        refused (``refused``, error); None if this host has no room or
        lacks the labels now (offer it to the fleet instead). The claim is
        the same create as any host's: it is stored before the task runs."""
        if self._stopped.is_set() or self.free() <= 0 or not has_labels(self.labels,
                                                                         record.labels):
            return None
        try:
            revision = self.connection.call(self._claim(record), timeout)
        except TaskmanError as error:  # the claim may be stored all the same: never run
            record.phase = REFUSED
            record.error = f"the fleet did not confirm the claim: {error}"
            record.error_kind = type(error).__name__
            gevent.spawn(self._settle, record, 0)
            raise
        if revision is None:  # a fresh id is nobody's: only a replayed start gets here
            return None
        try:
            self._run_claimed(record, revision, None)
        finally:
            self._claiming -= 1
        return record

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

    def _run_claimed(self, record: Record, revision: int, message,
                     reply: Optional[str] = None) -> bool:
        """Run a task this host claimed, answer the replica (at ``reply``, or
        the queued ``message``'s inbox), then (on the loop, not waited for:
        the next offer is taken meanwhile) record ``running`` and ack the
        queued offer."""
        if message is not None:
            reply = (message.headers or {}).get(REPLY)
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
