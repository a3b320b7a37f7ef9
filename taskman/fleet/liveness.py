"""Host liveness: heartbeats that expire, lost hosts, and fencing.

Each host puts its heartbeat into the hosts bucket every ``ttl / 6``; the
bucket's entries expire ``ttl`` after their last put, so a key that is gone
is a host that is dead or cut off. Any replica may then mark that host's
tasks ended with status UNKNOWN and source ``lost`` (a CAS, so replicas
racing to do it agree). The host itself counts from the moment it SENT its
last heartbeat that was acknowledged: when that is ``fence_after`` old
(half the TTL), it stops its own tasks. The key can only have expired after
``ttl`` from a put that was sent no earlier, so a task is fenced before
anyone can record it lost, never after.
"""

import json
import logging
import time
from typing import Callable, Dict, Optional

import gevent
import gevent.event
from nats.js.errors import KeyNotFoundError

from taskman.fleet.connection import HOSTS_BUCKET, Connection
from taskman.fleet.records import ENDED, LOST, Record, Records
from taskman.task import JobStatus

log = logging.getLogger("taskman.fleet.liveness")


def live_hosts(connection: Connection) -> Dict[str, dict]:
    """node name -> its last heartbeat, for every host whose key has not expired."""
    bucket = connection.hosts
    prefix = f"$KV.{HOSTS_BUCKET}."
    info = connection.call(connection.jetstream.stream_info(
        f"KV_{HOSTS_BUCKET}", subjects_filter=prefix + ">"))  # see Records.ids
    keys = [subject[len(prefix):] for subject in (info.state.subjects or {})]
    found = {}
    for key in keys:
        try:
            entry = connection.call(bucket.get(key))
        except KeyNotFoundError:
            continue
        if entry.value:
            found[key] = json.loads(entry.value)
    return found


class Heartbeat:
    """This host's heartbeat, and its fence.

    ``describe()`` returns what the heartbeat carries (capacity, running
    tasks). ``fence()`` is called once when the host has been cut off for
    ``fence_after`` seconds, and must stop every task the host runs.
    """

    def __init__(self, connection: Connection, describe: Callable[[], dict],
                 fence: Callable[[], None], fence_after: Optional[float] = None):
        self.connection = connection
        self.node = connection.settings.node
        self.ttl = connection.settings.heartbeat_ttl
        self.interval = self.ttl / 6
        self.fence_after = fence_after if fence_after is not None else self.ttl / 2
        self.describe = describe
        self.fence = fence
        self.last_acknowledged = time.monotonic()  # when the last acked put was sent
        self.fenced = False
        self._stopped = gevent.event.Event()
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self) -> "Heartbeat":
        self.beat()
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self, remove: bool = True) -> None:
        """Stop beating; ``remove`` deletes the key at once (a clean leave)."""
        self._stopped.set()
        if self._greenlet is not None:
            self._greenlet.kill(timeout=5)
        if remove:
            try:
                self.connection.call(self.connection.hosts.delete(self.node), 5.0)
            except Exception as error:  # it expires by itself
                log.warning("liveness: could not remove %s's heartbeat: %r", self.node, error)

    def beat(self) -> bool:
        """Put one heartbeat; True if the fleet acknowledged it."""
        sent = time.monotonic()
        value = json.dumps({"node": self.node, "time": time.time(), **self.describe()})
        try:
            self.connection.call(self.connection.hosts.put(self.node, value.encode()),
                                 self.interval * 2)
        except Exception as error:
            log.warning("liveness: heartbeat not stored: %r", error)
            return False
        self.last_acknowledged = sent
        if self.fenced:
            log.warning("liveness: back in touch with the fleet after being fenced")
            self.fenced = False
        return True

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()
            if not self.fenced and time.monotonic() - self.last_acknowledged > self.fence_after:
                self.fenced = True
                log.error("liveness: no heartbeat acknowledged for %.1f s: stopping this "
                          "host's tasks (they are about to be recorded lost)", self.fence_after)
                try:
                    self.fence()
                except Exception:
                    log.exception("liveness: fencing failed")


def is_live(connection: Connection, node: str) -> bool:
    """True if ``node``'s heartbeat key is there (read directly, not from a
    listing). An error other than "no such key" counts as live: a host is
    declared dead only on evidence."""
    try:
        entry = connection.call(connection.hosts.get(node), 5.0)
    except KeyNotFoundError:  # expired, or deleted by a clean leave
        return False
    except Exception as error:  # the fleet is away: decide next round
        log.info("liveness: cannot read %s's heartbeat: %r", node, error)
        return True
    return bool(entry.value)


class LiveHosts:
    """``node in live``: is_live, asked once per node per round."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._known: Dict[str, bool] = {}

    def __contains__(self, node: object) -> bool:
        if node not in self._known:
            self._known[node] = is_live(self.connection, str(node))
        return self._known[node]


def _record_lost(record: Record) -> bool:
    record.phase = ENDED
    record.status = int(JobStatus.UNKNOWN)
    record.source = LOST
    record.end_time = time.time()
    return True


def mark_lost(records: Records, live) -> list:
    """Record every task on a host not in ``live`` (a dict of live_hosts, or
    a LiveHosts) as ended, UNKNOWN, ``lost``.

    Returns the ids this call marked (a concurrent replica marks the rest).
    """
    marked = []
    for record in records.all():
        if not record.on_host or record.host in live:
            continue

        def lose(current: Record) -> bool:
            return current.on_host and current.host not in live and _record_lost(current)

        if records.modify(record.id, lose)[1]:
            marked.append(record.id)
            log.warning("task %s recorded lost: its host %s stopped answering",
                        record.id, record.host)
    return marked


def record_lost_on(records: Records, task_id: str, node: str) -> bool:
    """Record the task lost if it is still active on ``node``; True if this
    call did. For a host taking back its tasks after a restart: one its
    manager cannot account for is lost (its heartbeat name stayed alive, so
    no detector would find it)."""
    def lose(current: Record) -> bool:
        return current.on_host and current.host == node and _record_lost(current)

    if records.modify(task_id, lose)[1]:
        log.warning("task %s recorded lost: its host %s restarted without it", task_id, node)
        return True
    return False


class LostDetector:
    """Looks for lost hosts every ``interval`` (a third of the TTL), so a
    dead host's tasks are recorded lost within about 1.4 TTL."""

    def __init__(self, connection: Connection, records: Records,
                 interval: Optional[float] = None):
        self.connection = connection
        self.records = records
        self.interval = interval or connection.settings.heartbeat_ttl / 3
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self) -> "LostDetector":
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=5)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                mark_lost(self.records, LiveHosts(self.connection))
            except Exception as error:  # the fleet is away: try again next round
                log.warning("liveness: lost-host check failed: %r", error)
