"""The interface the servicer talks to, and its fleet implementation.

``Backend`` is TaskManager's public API as a protocol: the standalone
``taskman.manager.TaskManager`` implements it as is; ``FleetBackend``
implements it over the fleet, for a server that is one replica of many. The
servicer holds one or the other and never asks which.
"""

import collections
import datetime
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional, Protocol, runtime_checkable

import gevent
import gevent.event
import nats.errors

from taskman import quotas
from taskman.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from taskman.fleet import dispatch, liveness, offers, output, views
from taskman.fleet.connection import Connection, control_subject
from taskman.fleet.records import Record, Records
from taskman.output import Chunk, Selector, data_only
from taskman.task import JobStatus, Task, parse_task_id

if TYPE_CHECKING:
    from taskman.fleet.worker import Worker

log = logging.getLogger("taskman.fleet.backend")

ADMIN = "admin"
HOSTS_FRESH = 1.0  # seconds a replica reuses what the hosts' heartbeats said


@runtime_checkable
class Backend(Protocol):
    """Where tasks run, as the servicer sees it (see TaskManager for each
    method's contract: the same arguments, returns and errors)."""

    def start(self, owner: str, command: str, args: Iterable[str] = (),
              separate_streams: bool = False, **placement) -> Task: ...

    def stop(self, requester: str, task_id: str, wait: Optional[float] = None) -> Task: ...

    def status(self, requester: str, task_id: str) -> Task: ...

    def stream(self, requester: str, task_id: str,
               cancelled: Optional[gevent.event.Event] = None, **view) -> Iterator[bytes]: ...

    def chunks(self, requester: str, task_id: str,
               cancelled: Optional[gevent.event.Event] = None, offset: int = 0,
               selector: Selector = Selector.ALL, tail_bytes: int = 0, tail_lines: int = 0,
               since: Optional[datetime.datetime] = None,
               follow: bool = True) -> Iterator[Chunk]: ...

    def tasks(self, requester: str, owner: Optional[str] = None,
              statuses: Iterable[JobStatus] = (), limit: int = 0,
              after: Optional[str] = None) -> list: ...

    def shutdown(self, timeout: Optional[float] = None) -> None: ...


class FleetBackend:
    """The replica's half of the fleet: records, dispatch, following and
    stopping through NATS. The host's half (running what it claimed) is
    ``taskman.fleet.worker.Worker``; a fleet server runs both."""

    places_by_labels = True  # start() takes node_labels (a standalone manager does not)

    def __init__(self, connection: Connection, admins: Iterable[str] = (ADMIN,),
                 placement_timeout: float = offers.PLACEMENT_TIMEOUT,
                 running_quota: int = 0, local: Optional["Worker"] = None):
        self.connection = connection
        # This server's own host (a fleet server is both), which takes a
        # start with no offer between connections when it is among the least
        # loaded hosts (``_here``); None: a replica with no host of its own.
        self.local = local
        self.records = Records(connection)
        self.admins = frozenset(admins)
        self.placement_timeout = placement_timeout
        self.running_quota = running_quota  # each user's running tasks, fleet-wide (0: none)
        self._closing = False
        self._hosts: Optional[tuple] = None  # (when read, node -> heartbeat)
        self._placed_since = collections.Counter()  # owner -> starts since that read
        self._reading: Optional[gevent.Greenlet] = None

    def _live_hosts(self) -> dict:
        """The live hosts' heartbeats. Read once HOSTS_FRESH old, in the
        background (a start does not wait for the few reads), except the
        first time."""
        if self._hosts is None:
            self._read_hosts()
        elif time.monotonic() - self._hosts[0] > HOSTS_FRESH and self._reading is None:
            self._reading = gevent.spawn(self._read_hosts)
        return self._hosts[1]

    def _read_hosts(self) -> None:
        try:
            self._hosts = (time.monotonic(), liveness.live_hosts(self.connection))
            self._placed_since = collections.Counter()
        except Exception as error:  # the last snapshot stands; the next start retries
            if self._hosts is None:
                raise
            log.warning("fleet: could not read the hosts' heartbeats: %r", error)
        finally:
            self._reading = None

    def running_of(self, owner: str) -> int:
        """``owner``'s running tasks in the whole fleet, as the hosts' last
        heartbeats (each at most TTL/6 old) counted them, plus the starts
        this replica placed since it read them."""
        counted = sum((beat.get("users") or {}).get(owner, 0)
                      for beat in self._live_hosts().values())
        return counted + self._placed_since[owner]

    def _check_placement(self, owner: str, labels: dict) -> None:
        if self.running_quota:
            running = self.running_of(owner)
            if running >= self.running_quota:
                raise quotas.exceeded("running_tasks", running, self.running_quota, owner)
        if labels and not any(dispatch.has_labels(beat.get("labels") or {}, labels)
                              for beat in self._live_hosts().values()):
            wanted = ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))
            raise ResourceExhausted(f"no live host in the fleet has the labels {wanted}")

    def start(self, owner: str, command: str, args: Iterable[str] = (),
              separate_streams: bool = False,
              node_labels: Optional[Mapping[str, str]] = None) -> Task:
        """As TaskManager.start, on some host with room and every one of
        ``node_labels``. ResourceExhausted at once if no live host has them,
        or if ``owner`` runs ``running_quota`` tasks in the fleet already
        (counted as ``running_of`` says: a burst on several replicas within
        one heartbeat may pass it; each host's own quota still holds)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        if not owner:
            raise InvalidArgument("no user given")
        if not command:
            raise InvalidArgument("no command given")
        labels = dict(node_labels or {})
        self._check_placement(owner, labels)
        record = Record(id=str(uuid.uuid4()), owner=owner, command=command, args=list(args),
                        separate_streams=separate_streams, labels=labels)
        placed = self._here(record) or offers.place(self.records, record, self.placement_timeout)
        self._placed_since[owner] += 1
        return placed.to_task()

    def _here(self, record: Record) -> Optional[Record]:
        """Run the start on this server's own host if it has room and is
        among the least loaded live hosts (running over capacity, as their
        heartbeats said and this host counts now, less one): the claim is
        the same replicated create as any host's, but no offer and no
        answer cross the fleet. None: offer it to the fleet. Ties stay here,
        so starts spread as the replicas clients use do; a replica that
        gets every start still sends them on once another host is less
        loaded."""
        local = self.local
        if local is None:
            return None
        # One task of its own is not held against it: it is often the last
        # start's, exited and its output still being published (counted
        # until its end is recorded), and the others' beats are older.
        load = (local.capacity - local.claimer.free() - 1) / local.capacity
        for node, beat in self._live_hosts().items():
            capacity = beat.get("capacity") or 0
            if node != local.node and capacity and beat.get("running", 0) / capacity < load:
                return None
        record.requested_time = time.time()
        claimed = local.claimer.claim_here(record, self.placement_timeout)
        if claimed is not None:
            return offers.outcome(claimed)
        return None

    def _lookup(self, requester: str, task_id: str) -> Record:
        task_id = parse_task_id(task_id)
        record, _ = self.records.get(task_id)
        if requester not in self.admins and record.owner != requester:
            raise NotFound(f"no task {task_id}")
        return record

    def status(self, requester: str, task_id: str) -> Task:
        return self._lookup(requester, task_id).to_task()

    def stop(self, requester: str, task_id: str, wait: Optional[float] = None) -> Task:
        """Ask the task's host to stop it; return the record as it then is.
        Unavailable if the host does not answer (it is then found lost)."""
        record = self._lookup(requester, task_id)
        if not record.on_host:
            return record.to_task()
        request = json.dumps({"task": record.id, "wait": wait}).encode()
        try:
            self.connection.call(self.connection.client.request(
                control_subject(record.host, "stop"), request, timeout=(wait or 30.0) + 5.0),
                (wait or 30.0) + 10.0)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise Unavailable(f"the host {record.host} running task {record.id} did not "
                              f"answer the stop") from error
        return self.status(requester, task_id)

    def stream(self, requester: str, task_id: str,
               cancelled: Optional[gevent.event.Event] = None, **view) -> Iterator[bytes]:
        return data_only(self.chunks(requester, task_id, cancelled, **view))

    def chunks(self, requester: str, task_id: str,
               cancelled: Optional[gevent.event.Event] = None, offset: int = 0,
               selector: Selector = Selector.ALL, tail_bytes: int = 0, tail_lines: int = 0,
               since: Optional[datetime.datetime] = None, follow: bool = True) -> Iterator[Chunk]:
        """As TaskManager.chunks; a tail or ``since`` costs one replay of the
        output stored now to find where the view starts (taskman.fleet.views)."""
        record = self._lookup(requester, task_id)
        selector = Selector(selector)
        if tail_bytes or tail_lines or since is not None:
            since_ns = int(since.timestamp() * 1e9) if since is not None else None
            stored = output.follow(self.connection, record.id, 0, cancelled, live=False)
            offset = max(offset, views.view_start(stored, selector, tail_bytes, tail_lines,
                                                  since_ns))
        chunks = output.follow(self.connection, record.id, offset, cancelled, live=follow)
        return chunks if selector is Selector.ALL else views.selected(chunks, selector)

    def tasks(self, requester: str, owner: Optional[str] = None,
              statuses: Iterable[JobStatus] = (), limit: int = 0,
              after: Optional[str] = None) -> list:
        if requester not in self.admins:
            owner = requester
        wanted = set(statuses)
        records = sorted(self.records.all(), key=lambda record: (record.requested_time, record.id),
                         reverse=True)
        if after:
            after = parse_task_id(after)
            ids = [record.id for record in records]
            if after not in ids:
                raise InvalidArgument("the listing's page token is no longer valid "
                                      "(its task was removed): list again")
            records = records[ids.index(after) + 1:]
        found = []
        for record in records:
            task = record.to_task()
            if (not owner or task.owner == owner) and (not wanted or task.status in wanted):
                found.append(task)
                if limit and len(found) == limit:
                    break
        return found

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Refuse new starts; the records and output stay in the fleet."""
        self._closing = True


def wait_ended(backend: Backend, requester: str, task_id: str, timeout: float) -> Task:
    """Poll until the task is no longer running (for tests and the CLI's run)."""
    deadline = time.monotonic() + timeout
    while True:
        task = backend.status(requester, task_id)
        if not task.running or time.monotonic() > deadline:
            return task
        gevent.sleep(0.05)
