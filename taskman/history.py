"""The finished tasks: records in the store, output in files, not in memory.

History costs disk, not memory: once a task has ended and its record is
saved, the manager drops it, and everything about it is read back on demand
(its status from the store, its output by reopening its log). What stays in
memory is per user, not per task: each user's count of finished records and
their output bytes (the disk budget and the quotas), summed by the store once
at start and kept up to date as tasks end and are forgotten; the output
logs someone is reading, held only as long as they are (weak references),
so retention can spare them; and a bounded number of the records that ended
last, which are the ones asked for most (a client waiting for its task's
end, the quotas' counts).
"""

import collections
import logging
import types
import weakref
from typing import Dict, Iterable, Iterator, Optional, Tuple

import gevent
import gevent.event

from taskman import retention
from taskman.output import OutputLog, log_path, reopen_log
from taskman.output_index import index_path, remove_files
from taskman.store import TaskStore
from taskman.task import Task

log = logging.getLogger("taskman.history")

# Records forgotten per retention pass: a pass over a million expired records
# would hold the hub for seconds; between passes others run.
PRUNE_BATCH = 5000
# Records that ended last, kept in memory: about 1 KiB each, so a few MiB
# whatever the history holds.
RECENT = 4096

Row = Tuple[str, str, int]  # id, owner, output size: what retention needs of a record


class History:
    """Finished tasks of one manager: totals in memory, the rest on disk."""

    def __init__(self, store: TaskStore, output_dir: str):
        self.store = store
        self.output_dir = output_dir
        self.records: Dict[str, int] = {}  # user -> finished records kept
        self.bytes: Dict[str, int] = {}  # user -> their output bytes on disk
        for owner, (count, size) in store.finished_totals().items():
            self.records[owner], self.bytes[owner] = count, size
        self.total_bytes = sum(self.bytes.values())
        # task id -> its log, while someone holds it (a reader, a follower).
        self._logs: "weakref.WeakValueDictionary[str, OutputLog]" = weakref.WeakValueDictionary()
        self._recent: "collections.OrderedDict[str, Task]" = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(self.records.values())

    def add(self, task: Task, output: OutputLog) -> None:
        """Count a task that just ended (``task``: its saved record); its
        followers keep reading ``output``."""
        self.records[task.owner] = self.records.get(task.owner, 0) + 1
        self.bytes[task.owner] = self.bytes.get(task.owner, 0) + output.size
        self.total_bytes += output.size
        self._logs[task.id] = output
        self._recent[task.id] = task
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)  # the earliest ended: not moved when read

    def record(self, task_id: str) -> Optional[Task]:
        """The saved record of ``task_id`` (None if there is none)."""
        recent = self._recent.get(task_id)
        return recent.snapshot() if recent is not None else self.store.load(task_id)

    def log(self, task: Task) -> OutputLog:
        """The output log of finished ``task``: the one being read if any
        (one object per log, so retention sees every reader), else reopened."""
        output = self._logs.get(task.id)
        if output is None:
            output = reopen_log(self.output_dir, task.id)
            output.dropped, output.write_error = task.output_dropped, task.output_note or None
            output.date_unindexed(task.start_time)
            self._logs[task.id] = output
        return output

    def in_use(self, task_id: str) -> bool:
        output = self._logs.get(task_id)
        return output is not None and output.in_use

    def prune(self, age: float, budget: int, records_to_forget=None) -> int:
        """Forget the finished tasks retention chooses (see ``taskman.retention``),
        in batches; return how many."""
        forgotten = 0
        while True:
            doomed = retention.select(self.store, age, budget, self.total_bytes,
                                      self.in_use, PRUNE_BATCH)
            if records_to_forget is not None and len(doomed) < PRUNE_BATCH:
                doomed += retention.past_record_quota(self.store, self.records, doomed,
                                                      records_to_forget, self.in_use,
                                                      PRUNE_BATCH - len(doomed))
            self._forget(doomed)
            forgotten += len(doomed)
            if len(doomed) < PRUNE_BATCH:
                return forgotten
            gevent.sleep(0)

    def _forget(self, rows: Iterable[Row]) -> None:
        rows = list(rows)
        if not rows:
            return
        # Records first: should the disk fail here, nothing is counted twice.
        self.store.delete(task_id for task_id, _, _ in rows)
        for task_id, owner, size in rows:
            self.records[owner] -= 1
            self.bytes[owner] -= size
            self.total_bytes -= size
            if not self.records[owner]:
                del self.records[owner], self.bytes[owner]
            self._recent.pop(task_id, None)
            output = self._logs.pop(task_id, None)
            if output is not None:
                output.finish()
            remove_files(log_path(self.output_dir, task_id), index_path(self.output_dir, task_id))

    def quota_entries(self) -> Iterator:
        """Each user's finished output as one ended entry, for the output
        quota's sweep (``taskman.output_quota``), which adds up entries."""
        for owner, size in list(self.bytes.items()):
            yield types.SimpleNamespace(task=types.SimpleNamespace(owner=owner),
                                        log=types.SimpleNamespace(size=size), ended=_ENDED)


_ENDED = gevent.event.Event()
_ENDED.set()
