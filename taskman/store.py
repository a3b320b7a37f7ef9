"""Task records on disk: an SQLite database in the state directory.

Why SQLite in WAL mode with ``synchronous=NORMAL``: a write costs ~10 us
(p99 ~40 us, measured here), so it can run on the gevent loop without a
thread hop; a crash of the server loses nothing already written, and only a
power loss can drop the last few commits (the database stays consistent).
Except a checkpoint (the WAL copied back into the database, then fsync):
10-100 ms on this machine's disk, which SQLite runs inside whichever commit
crosses its threshold, holding the whole event loop (2 of 6,000 writes took
13 ms or more, one 117 ms, and they made the mean write 5x the median). So a
thread of the store's own checkpoints every CHECKPOINT_COMMITS commits, on
its own connection (sqlite3 releases the GIL while it works). But a WAL is
only started over by a commit that finds it wholly copied back, which under
steady writes the thread never leaves it (it grew past 250 MB in 6,000
writes): so commits still checkpoint, as SQLite does, but only past
WAL_PAGES, when all but the last few commits' pages are copied already:
a few pages and two fsyncs on the loop, once every few hundred starts.
Only records live here; the output stays in the per-task files. Finished
tasks live only here (``taskman.history``): their statuses, listings and
retention are queries through the indexes below, never a walk of every record.

Beside each task's record: the uid it runs as and the start identity of its
main process (what crash recovery recognises it by), and the identity -> uid
mapping the server used. The file is 0600 in a 0700 directory, owned by the
server's user: no task can read or change it (docs/security.md).
"""

import datetime
import heapq
import json
import logging
import operator
import os
import sqlite3
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

import gevent.threadpool

from taskman.errors import StoreError
from taskman.task import JobStatus, Source, Task

# 2: the processes and users tables (added to a 1 as they are). The indexes
# changed without a new version: an older taskman reads the same tables.
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,            -- JSON list
    pid INTEGER NOT NULL,
    status INTEGER NOT NULL,
    exit_code INTEGER,
    signal TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    start_time REAL NOT NULL,      -- seconds since the epoch, UTC
    end_time REAL,
    output_size INTEGER NOT NULL DEFAULT 0,
    output_dropped INTEGER NOT NULL DEFAULT 0,
    output_note TEXT NOT NULL DEFAULT ''
);
-- Listings, newest first: one index walk; with a status filter, one per status, merged.
CREATE INDEX IF NOT EXISTS tasks_by_start ON tasks (start_time, id);
CREATE INDEX IF NOT EXISTS tasks_by_owner_start ON tasks (owner, start_time, id);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, start_time, id);
CREATE INDEX IF NOT EXISTS tasks_by_owner_status ON tasks (owner, status, start_time, id);
-- Retention: oldest ended first, everyone's and each user's.
CREATE INDEX IF NOT EXISTS tasks_by_end ON tasks (end_time);
CREATE INDEX IF NOT EXISTS tasks_by_owner_end ON tasks (owner, end_time);
DROP INDEX IF EXISTS tasks_by_owner;  -- (owner, start_time): superseded by tasks_by_owner_start
CREATE TABLE IF NOT EXISTS processes (
    task_id TEXT PRIMARY KEY,
    uid INTEGER NOT NULL,          -- the uid the task runs as
    start_identity TEXT NOT NULL   -- host.start_identity of the main process
);
CREATE TABLE IF NOT EXISTS users (
    identity TEXT PRIMARY KEY,
    uid INTEGER NOT NULL
);
"""

log = logging.getLogger("taskman.store")

# A start and an end write about 16 pages; SQLite's own default is 1000 pages.
CHECKPOINT_COMMITS = 100
WAL_PAGES = 4000  # 16 MiB of WAL

_COLUMNS = ("id", "owner", "command", "args", "pid", "status", "exit_code", "signal",
            "source", "start_time", "end_time", "output_size", "output_dropped", "output_note")
_SELECT = ", ".join(_COLUMNS)
_START_AND_ID = operator.itemgetter(_COLUMNS.index("start_time"), 0)
# A record's identity (what no later save of it changes), and the rest.
_KEY = tuple(_COLUMNS.index(name) for name in ("id", "owner", "command", "args", "start_time"))
_CHANGING = tuple(index for index in range(len(_COLUMNS)) if index not in _KEY)
_UPDATE = (f"UPDATE tasks SET {', '.join(_COLUMNS[i] + ' = ?' for i in _CHANGING)} "
           f"WHERE {' AND '.join(_COLUMNS[i] + ' = ?' for i in _KEY)}")


class TaskStore:
    """Reads and writes task records; one connection, used from the hub only."""

    def __init__(self, path: str):
        """Open the database at ``path``, created if missing.

        Raises StoreError if a newer taskman wrote it (its schema is unknown).
        """
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise StoreError(f"{path} was written by a newer taskman (schema {version})")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        self._commits = 0
        self._checkpointer: Optional[gevent.threadpool.ThreadPool] = None
        self._checkpointing = None  # the checkpoint under way, if any
        self._checkpoint_db: Optional[sqlite3.Connection] = None

    def save(self, task: Task) -> None:
        """Insert or replace the record of ``task``.

        A record saved again (a task's end) is updated in place where its
        id, owner, command, arguments and start time are as saved: the
        indexes of the start and owner then stay as they are, where a
        REPLACE deleted and reinserted the row in all seven (an end's save
        took ~0.1 ms on the loop, this ~half)."""
        row = _to_row(task)
        if not self._db.execute(_UPDATE, [row[i] for i in _CHANGING + _KEY]).rowcount:
            self._insert(row)
        self._committed()

    def _save(self, task: Task) -> None:
        self._insert(_to_row(task))

    def _insert(self, row) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO tasks ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)

    def delete(self, task_ids: Iterable[str]) -> None:
        ids = [(i,) for i in task_ids]
        self._db.executemany("DELETE FROM tasks WHERE id = ?", ids)
        self._db.executemany("DELETE FROM processes WHERE task_id = ?", ids)
        self._committed()

    def save_started(self, task: Task, uid: int, start_identity: str) -> None:
        """Record a task that just started: its record and its process, in
        one transaction (one commit, not two, on the start's path)."""
        with self._db:  # BEGIN ... COMMIT, or ROLLBACK if either fails
            self._db.execute("BEGIN")
            self._save(task)
            self.save_process(task.id, uid, start_identity)
        self._committed()

    def save_process(self, task_id: str, uid: int, start_identity: str) -> None:
        """Record the uid and the main process's start identity of a task."""
        self._db.execute("INSERT OR REPLACE INTO processes (task_id, uid, start_identity) "
                         "VALUES (?, ?, ?)", (task_id, uid, start_identity))

    def processes(self) -> Dict[str, Tuple[int, str]]:
        """task id -> (uid, start identity of its main process)."""
        return {row[0]: (row[1], row[2]) for row in
                self._db.execute("SELECT task_id, uid, start_identity FROM processes")}

    def save_user(self, identity: str, uid: int) -> Optional[int]:
        """Record that ``identity``'s tasks run as ``uid``; return the uid
        recorded before if it was a different one, else None."""
        row = self._db.execute("SELECT uid FROM users WHERE identity = ?", (identity,)).fetchone()
        if row is not None and row[0] == uid:
            return None
        self._db.execute("INSERT OR REPLACE INTO users (identity, uid) VALUES (?, ?)", (identity, uid))
        return row[0] if row is not None else None

    def users(self) -> Dict[str, int]:
        """identity -> uid, as recorded."""
        return dict(self._db.execute("SELECT identity, uid FROM users"))

    def load_all(self) -> List[Task]:
        """Every record, oldest first (tests and tools: a server never holds them all)."""
        cursor = self._db.execute(f"SELECT {_SELECT} FROM tasks ORDER BY start_time")
        return [_from_row(row) for row in cursor]

    def load(self, task_id: str) -> Optional[Task]:
        """The record of ``task_id``, or None."""
        row = self._db.execute(f"SELECT {_SELECT} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _from_row(row) if row is not None else None

    def load_running(self, skip: FrozenSet[str] = frozenset()) -> List[Task]:
        """The records still STARTED (running, or left running by a crash),
        oldest first, but those of ``skip`` (a reload's adopted tasks: not
        built only to be passed over)."""
        cursor = self._db.execute(f"SELECT {_SELECT} FROM tasks WHERE status = ? "
                                  f"ORDER BY start_time", (int(JobStatus.STARTED),))
        return [_from_row(row) for row in cursor if row[0] not in skip]

    def newest(self, statuses: Iterable[JobStatus] = (), owner: Optional[str] = None,
               before: Optional[Tuple[float, str]] = None) -> Iterator[Task]:
        """The records (of ``owner`` if given; in ``statuses``, if any), newest
        first: by start time, then id. ``before``: a (start time, id) to
        continue after. Lazy and through an index: a page reads its rows only."""
        walks = [self._newest(status, owner, before) for status in sorted(set(statuses))]
        if not walks:
            rows = self._newest(None, owner, before)
        else:
            rows = heapq.merge(*walks, key=_START_AND_ID, reverse=True)
        return map(_from_row, rows)

    def _newest(self, status: Optional[JobStatus], owner: Optional[str],
                before: Optional[Tuple[float, str]]) -> Iterator[tuple]:
        where, values = [], []
        if status is not None:
            where.append("status = ?")
            values.append(int(status))
        if owner is not None:
            where.append("owner = ?")
            values.append(owner)
        if before is not None:
            where.append("(start_time, id) < (?, ?)")
            values.extend(before)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        return self._db.execute(f"SELECT {_SELECT} FROM tasks {condition} "
                                f"ORDER BY start_time DESC, id DESC", values)

    def position(self, task_id: str) -> Optional[Tuple[float, str]]:
        """(start time, id) of ``task_id``, where a listing continues; None if gone."""
        return self._db.execute("SELECT start_time, id FROM tasks WHERE id = ?",
                                (task_id,)).fetchone()

    def finished_totals(self) -> Dict[str, Tuple[int, int]]:
        """owner -> (finished records, their output bytes): one pass, at start."""
        cursor = self._db.execute("SELECT owner, COUNT(*), TOTAL(output_size) FROM tasks "
                                  "WHERE status != ? GROUP BY owner", (int(JobStatus.STARTED),))
        return {owner: (count, int(size)) for owner, count, size in cursor}

    def oldest_ended(self, owner: Optional[str] = None) -> Iterator[Tuple[str, str, int]]:
        """(id, owner, output size) of finished records, the earliest ended
        first (of ``owner`` if given). Lazy: read only as far as retention
        needs. A record without an end time (supervision failed before it
        could record one) is never chosen by its age or size."""
        where, values = "end_time IS NOT NULL", []
        if owner is not None:
            where += " AND owner = ?"
            values.append(owner)
        return self._db.execute(f"SELECT id, owner, output_size FROM tasks WHERE {where} "
                                f"ORDER BY end_time", values)

    def ended_before(self, horizon: float) -> Iterator[Tuple[str, str, int]]:
        """(id, owner, output size) of the records that ended before ``horizon``
        (seconds since the epoch), earliest first."""
        return self._db.execute("SELECT id, owner, output_size FROM tasks "
                                "WHERE end_time < ? ORDER BY end_time", (horizon,))

    def close(self) -> None:
        if self._checkpointing is not None:
            self._checkpointing.wait()
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
        if self._checkpointer is not None:
            self._checkpointer.kill()
        self._db.close()  # the last connection to close checkpoints what is left

    # -- checkpoints

    def _committed(self) -> None:
        self._commits += 1
        if self._commits < CHECKPOINT_COMMITS:
            return
        if self._checkpointing is not None and not self._checkpointing.ready():
            return  # the WAL grows meanwhile; a later commit asks again
        self._commits = 0
        if self._checkpointer is None:
            self._checkpointer = gevent.threadpool.ThreadPool(1)
        self._checkpointing = self._checkpointer.spawn(self._checkpoint)

    def _checkpoint(self) -> None:
        """In the checkpointer's thread: copy the WAL into the database.
        PASSIVE: never waits for a reader or the writer, does what it can."""
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(self.path, isolation_level=None,
                                                      check_same_thread=False)
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as error:  # noqa: BLE001 - sqlite3 raises many kinds; the next one retries
            log.warning("task store: checkpoint failed: %s", error)


def _timestamp(value: Optional[datetime.datetime]) -> Optional[float]:
    return value.timestamp() if value is not None else None


def _datetime(value: Optional[float]) -> Optional[datetime.datetime]:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(value, _UTC)


def _to_row(task: Task) -> tuple:
    return (task.id, task.owner, task.command, json.dumps(task.args), task.pid,
            int(task.status), task.exit_code, task.signal, task.source.value,
            _timestamp(task.start_time), _timestamp(task.end_time), task.output_size,
            task.output_dropped, task.output_note)


# Plain lookups: reading a record is on the path of every status and listing.
_UTC = datetime.timezone.utc
_STATUSES = {int(status): status for status in JobStatus}
_SOURCES = {source.value: source for source in Source}


def _from_row(row: tuple) -> Task:
    (task_id, owner, command, args, pid, status, exit_code, signal, source, start_time,
     end_time, output_size, output_dropped, output_note) = row
    return Task(task_id, owner, command, json.loads(args), pid, _STATUSES[status], exit_code,
                signal, _SOURCES[source], _datetime(start_time), _datetime(end_time), output_size,
                output_dropped, output_note)
