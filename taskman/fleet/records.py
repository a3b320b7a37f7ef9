"""Task records in the fleet: one JSON value per task in a JetStream KV bucket.

Every change is a compare-and-swap on the key's revision, so two replicas (or
a redelivered start) can never both move a record forward: the loser re-reads
and decides again. This is what makes a start run at most once.

A record's phase says where the task is in the fleet; once it runs, its
status fields say what a standalone server's Task would say:

    (offer) --a host creates it--> claimed --spawned--> running --end--> ended
       \\--no host in time: the replica creates it--> refused
    claimed --the host could not start it--> refused
    (claimed|running) --host lost--> ended

``pending`` is the phase of an offer in the dispatch stream, never stored:
the record is created by the host that claims it (taskman.fleet.dispatch).
"""

import dataclasses
import datetime
import json
import random
import time
from typing import Awaitable, Callable, List, Optional, Tuple

import gevent
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, ServiceUnavailableError

from taskman.errors import NotFound, TaskmanError, Unavailable
from taskman.fleet.bridge import FleetTimeout
from taskman.fleet.connection import PUBLISH_RETRY_WINDOW, TASKS_BUCKET, Connection
from taskman.task import JobStatus, Source, Task

PENDING = "pending"
CLAIMED = "claimed"
RUNNING = "running"
ENDED = "ended"
REFUSED = "refused"
ACTIVE = (CLAIMED, RUNNING)  # on a host: lost if the host is

# The termination source of a task whose host was lost: its status is
# JOB_STATUS_UNKNOWN, since nobody saw how it ended.
LOST = Source.LOST.value


READ_TIMEOUT = 5.0  # one attempt of a read; _read retries
TRANSIENT = (FleetTimeout, nats.errors.TimeoutError, nats.errors.NoRespondersError,
             ServiceUnavailableError)


class Conflict(TaskmanError):
    """Someone else changed the record since it was read (CAS lost)."""


def _time(value: Optional[float]) -> Optional[datetime.datetime]:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)


def _source(text: str) -> Source:
    try:
        return Source(text)
    except ValueError:  # written by a newer server: the closest older word
        return Source.SYSTEM


@dataclasses.dataclass
class Record:
    """What the fleet knows of one task. Times are seconds since the epoch."""

    id: str
    owner: str
    command: str
    args: list
    separate_streams: bool = False
    labels: dict = dataclasses.field(default_factory=dict)  # the host must have them all
    phase: str = PENDING
    host: str = ""
    pid: int = 0
    status: int = int(JobStatus.STARTED)
    exit_code: Optional[int] = None
    signal: str = ""
    source: str = ""
    error: str = ""  # why the task was refused or failed to start
    error_kind: str = ""  # the TaskmanError class name, for the servicer's table
    requested_time: float = 0.0
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    output_size: int = 0

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Record":
        fields = json.loads(data)
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in fields.items() if name in known})

    @property
    def on_host(self) -> bool:
        return self.phase in ACTIVE

    def to_task(self) -> Task:
        """The record as the Task a standalone manager would return."""
        status = JobStatus(self.status)
        if self.phase in (PENDING, CLAIMED):
            status = JobStatus.STARTED  # accepted, about to run: never "unknown" yet
        return Task(id=self.id, owner=self.owner, command=self.command, args=list(self.args),
                    pid=self.pid, status=status, exit_code=self.exit_code,
                    signal=self.signal, source=_source(self.source),
                    start_time=_time(self.start_time or self.requested_time),
                    end_time=_time(self.end_time), output_size=self.output_size)

    def finish_from(self, task: Task) -> None:
        """Copy a standalone Task's outcome into the record."""
        self.phase = ENDED if not task.running else self.phase
        self.status = int(task.status)
        self.pid = task.pid
        self.exit_code = task.exit_code
        self.signal = task.signal
        self.source = task.source.value
        self.end_time = task.end_time.timestamp() if task.end_time else None
        if self.start_time is None and task.start_time is not None:
            self.start_time = task.start_time.timestamp()
        self.output_size = task.output_size


class Records:
    """The tasks bucket: create, read, compare-and-swap, list."""

    def __init__(self, connection: Connection):
        self.connection = connection

    @property
    def _bucket(self):
        return self.connection.tasks

    def create(self, record: Record) -> int:
        """Store a new record; return its revision. Conflict if the id exists."""
        try:
            return self.connection.call(self._bucket.create(record.id, record.encode()))
        except KeyWrongLastSequenceError as error:
            raise Conflict(f"task {record.id} already exists") from error

    def _read(self, make: Callable[[], Awaitable]):
        """A read, retried through the bucket leader's election (a NATS node
        that just died: 5-7 s), as publishes are. Writes are not retried
        here: a CAS that timed out may have landed; ``modify`` re-reads."""
        deadline = time.monotonic() + PUBLISH_RETRY_WINDOW
        while True:
            try:
                return self.connection.call(make(), READ_TIMEOUT)
            except TRANSIENT as error:
                if time.monotonic() > deadline:
                    raise Unavailable(f"the fleet's task records did not answer: "
                                      f"{error!r}") from error
                gevent.sleep(0.25)

    def get(self, task_id: str) -> Tuple[Record, int]:
        """(record, revision); NotFound if there is none."""
        try:
            entry = self._read(lambda: self._bucket.get(task_id))
        except KeyNotFoundError as error:
            raise NotFound(f"no task {task_id}") from error
        if entry.value is None:
            raise NotFound(f"no task {task_id}")
        return Record.decode(entry.value), entry.revision

    def update(self, record: Record, revision: int) -> int:
        """Write ``record`` if the stored one is still at ``revision``; return
        the new revision. Conflict if another writer came first."""
        try:
            return self.connection.call(self._bucket.update(record.id, record.encode(), revision))
        except KeyWrongLastSequenceError as error:
            raise Conflict(f"task {record.id} changed under us") from error

    def modify(self, task_id: str, change: Callable[[Record], bool],
               attempts: int = 20) -> Tuple[Record, bool]:
        """Read, let ``change`` edit the record (it returns False to leave it
        as is), write back by CAS; on Conflict read again and retry.

        Returns (the record as stored, whether this call changed it).
        """
        for attempt in range(attempts):
            record, revision = self.get(task_id)
            if not change(record):
                return record, False
            try:
                self.update(record, revision)
                return record, True
            except Conflict:  # a short random pause, so racing writers spread out
                gevent.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise Conflict(f"task {task_id}: too many concurrent changes")

    def ids(self) -> List[str]:
        """Every task id in the bucket (removed ones too, until compacted).

        From the bucket's stream info, one request answered by the stream's
        leader: nats-py's ``keys()`` (a watcher) was seen to return only some
        of the keys under load, which made a live host look dead.
        """
        prefix = f"$KV.{TASKS_BUCKET}."
        info = self._read(lambda: self.connection.jetstream.stream_info(
            f"KV_{TASKS_BUCKET}", subjects_filter=prefix + ">"))
        return [subject[len(prefix):] for subject in (info.state.subjects or {})]

    def all(self) -> List[Record]:
        """Every record, in no particular order."""
        found = []
        for key in self.ids():
            try:
                found.append(self.get(key)[0])
            except NotFound:  # deleted between the listing and the read
                continue
        return found

    def delete(self, task_id: str) -> None:
        self.connection.call(self._bucket.purge(task_id))
