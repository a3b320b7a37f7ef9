"""The host's half of the fleet: run what this host claimed, on its own
TaskManager (sandbox, cgroups, quotas as on one host), and answer for it.

For each claimed task: start it locally, pump its output log to the fleet,
record its end. It also answers stop requests addressed to this host, beats
its heartbeat, fences (stops everything) when cut off, and removes from the
fleet what the local manager's retention removed (record and output).
"""

import json
import logging
import time
from typing import Dict, Optional

import gevent

from taskman.errors import NotFound, TaskmanError
from taskman.fleet import dispatch, liveness, output
from taskman.fleet.connection import Connection, control_subject
from taskman.fleet.records import ENDED, REFUSED, Record, Records

log = logging.getLogger("taskman.fleet.worker")

RETENTION_SWEEP = 60.0  # seconds between retention passes, as the manager's own


class Worker:
    """Runs fleet tasks on ``manager`` (a taskman.manager.TaskManager), at
    most ``capacity`` at once."""

    def __init__(self, connection: Connection, manager, capacity: int):
        self.connection = connection
        self.manager = manager
        self.capacity = capacity
        self.records = Records(connection)
        self.node = connection.settings.node
        # Task id -> owner of every fleet task this host's manager has (the
        # manager runs each under its fleet id), and of those still running.
        self.owners: Dict[str, str] = {}
        self._running: Dict[str, str] = {}
        self.claimer = dispatch.Claimer(connection, self.records, self._run, self.room)
        self.heartbeat = liveness.Heartbeat(connection, self._describe, self.fence)
        self.detector = liveness.LostDetector(connection, self.records)
        self._subscription = None
        self._sweeper: Optional[gevent.Greenlet] = None

    def room(self) -> int:
        return self.capacity - len(self._running)

    def _describe(self) -> dict:
        users: Dict[str, int] = {}
        for owner in self._running.values():
            users[owner] = users.get(owner, 0) + 1
        return {"capacity": self.capacity, "running": len(self._running),
                "labels": self.claimer.labels, "users": users}

    def start(self) -> "Worker":
        self.heartbeat.start()
        self.readopt()

        async def on_stop(message) -> None:
            gevent.spawn(self._answer_stop, message)  # manager calls block: a greenlet

        self._subscription = self.connection.call(self.connection.client.subscribe(
            control_subject(self.node, "stop"), cb=on_stop))
        self.claimer.start()
        self.detector.start()
        self._sweeper = gevent.spawn(self._sweep_periodically)
        return self

    def stop(self, leave: bool = True) -> None:
        """Take no more work; stop beating (``leave``: remove the heartbeat,
        a clean leave; otherwise it expires after the TTL)."""
        self.claimer.stop()
        self.detector.stop()
        if self._sweeper is not None:
            self._sweeper.kill(timeout=5)
        if self._subscription is not None:
            try:
                self.connection.call(self._subscription.unsubscribe(), 5.0)
            except Exception as error:  # the connection is going anyway
                log.debug("worker: unsubscribe failed: %r", error)
        self.heartbeat.stop(remove=leave)

    def _run(self, record: Record) -> int:
        """The Claimer's ``run``: start locally under the record's id;
        TaskmanError refuses."""
        task = self.manager.start(record.owner, record.command, record.args,
                                  separate_streams=record.separate_streams, task_id=record.id)
        self.owners[record.id] = record.owner
        self._running[record.id] = record.owner
        gevent.spawn(self._follow_through, record.id, record.owner)
        return task.pid

    def readopt(self) -> None:
        """Take back this node's tasks from an earlier life of this server
        (a restart, a reload in place): its manager still knows them (still
        running if adopted, ended by crash recovery otherwise), so their
        output goes on from where the fleet's copy ends and their end is
        recorded as it was. One its manager does not know is recorded lost."""
        for record in self.records.all():
            if record.host != self.node or not record.on_host or record.id in self.owners:
                continue
            try:
                self.manager.status(record.owner, record.id)
            except TaskmanError:  # never started here, or forgotten: nobody can tell
                liveness.record_lost_on(self.records, record.id, self.node)
                continue
            self.owners[record.id] = record.owner
            self._running[record.id] = record.owner
            gevent.spawn(self._follow_through, record.id, record.owner, resume=True)
            log.info("worker: task %s taken back from an earlier life", record.id)

    def _follow_through(self, task_id: str, owner: str, resume: bool = False) -> None:
        """Pump the output to the fleet, then record how the task ended."""
        try:
            offset, complete = output.stored_end(self.connection, task_id) if resume else (0, False)
            if not complete:
                output.Publisher(self.connection, task_id, offset).pump(
                    self.manager.chunks(owner, task_id, offset=offset, follow=True))
            task = self.manager.status(owner, task_id)
            while task.running:  # the log ends a moment before the record
                gevent.sleep(0.02)
                task = self.manager.status(owner, task_id)

            def finish(record: Record) -> bool:
                if record.host != self.node or not record.on_host:
                    return False  # recorded lost meanwhile: leave that verdict
                record.finish_from(task)
                return True

            self.records.modify(task_id, finish)
        except Exception as error:  # the task's own greenlet: log, never die silently
            log.error("worker: task %s: could not report its output or end: %r", task_id, error)
        finally:
            self._running.pop(task_id, None)

    def _answer_stop(self, message) -> None:
        reply = {"ok": True}
        try:
            request = json.loads(message.data)
            task_id = request["task"]
            owner = self.owners.get(task_id)
            if owner is None:
                reply = {"ok": False, "error": f"task {task_id} is not on {self.node}"}
            else:
                task = self.manager.stop(owner, task_id, wait=request.get("wait"))
                self._wait_recorded(task_id, task.running)
        except (TaskmanError, ValueError, KeyError) as error:
            reply = {"ok": False, "error": str(error)}
        try:
            self.connection.call(message.respond(json.dumps(reply).encode()), 5.0)
        except Exception as error:  # the replica's request times out: Unavailable there
            log.warning("worker: could not answer a stop: %r", error)

    def _wait_recorded(self, task_id: str, still_running: bool, timeout: float = 10.0) -> None:
        """A stop answers once the end is in the record, so the replica's
        status right after it is final (unless the grace outlasted ``wait``)."""
        if still_running:
            return
        with gevent.Timeout(timeout, False):
            while task_id in self._running:
                gevent.sleep(0.02)

    def fence(self) -> None:
        """Cut off from the fleet: stop every task this host runs."""
        for task_id, owner in list(self._running.items()):
            gevent.spawn(self.manager.stop, owner, task_id, 0)

    # -- retention: the fleet forgets what the hosts forget

    def _sweep_periodically(self) -> None:
        age = getattr(self.manager, "retention_age", 0) or 0
        interval = max(0.25, min(RETENTION_SWEEP, age / 4)) if age else RETENTION_SWEEP
        while True:
            gevent.sleep(interval)
            try:
                self.sweep(age)
            except Exception as error:  # the fleet is away: next round
                log.warning("worker: retention sweep failed: %r", error)

    def sweep(self, age: float) -> int:
        """Remove from the fleet (record and output) every task of this host
        that its manager's retention removed, and records no host answers for
        (lost, refused) older than ``age`` (0: keep those). Returns how many."""
        gone = []
        for task_id, owner in list(self.owners.items()):
            if task_id in self._running:
                continue
            try:
                self.manager.status(owner, task_id)
            except NotFound:
                gone.append(task_id)
        if age:
            horizon = time.time() - age
            live = liveness.LiveHosts(self.connection)
            for record in self.records.all():
                # A live host forgets its own; nobody else answers for these.
                orphan = (record.host not in live
                          or (record.host == self.node and record.id not in self.owners))
                if (record.phase in (ENDED, REFUSED) and orphan
                        and (record.end_time or record.requested_time) < horizon):
                    gone.append(record.id)
        for task_id in gone:
            self.forget(task_id)
        return len(gone)

    def forget(self, task_id: str) -> None:
        """The task's record and output out of the fleet."""
        output.forget(self.connection, task_id)
        self.records.delete(task_id)
        self.owners.pop(task_id, None)
        log.info("worker: retention removed task %s from the fleet", task_id)
