"""Which tasks a listing shows: the owner and status filters and the pages.

Read from the store, so listing costs the page, not the history: every task
has a record there from its start, finished ones only there. Per status, an
index (status or owner, status; then start time, id) yields the records
newest first; the statuses' walks are merged, so a page reads about
``limit`` rows per status whatever the store holds.
"""

import heapq
import itertools
from typing import Callable, Iterable, Iterator, Optional

from taskman.errors import InvalidArgument
from taskman.store import TaskStore
from taskman.task import JobStatus, Task, parse_task_id

GONE = "the listing's page token is no longer valid (its task was removed): list again"


def select(store: TaskStore, owner: Optional[str], statuses: Iterable[JobStatus],
           limit: int, after: Optional[str],
           live: Callable[[Task], Task] = lambda task: task) -> Iterator[Task]:
    """The records to list, newest first (by start time, then id).

    ``owner`` narrows to one user's (None or "": everyone's), ``statuses``
    to those states (empty: all); ``limit`` caps the count (0: all);
    ``after`` continues a listing after that task (InvalidArgument if it is
    gone, e.g. removed by retention). ``live`` maps a record to what to
    show (the manager's fresher snapshot of a running task).
    """
    wanted = sorted(set(statuses) or set(JobStatus))
    owner = owner or None
    before = None
    if after:
        position = store.position(parse_task_id(after))
        if position is None:
            raise InvalidArgument(GONE)
        before = position[:2]
    walks = [store.newest(status, owner, before) for status in wanted]
    merged = heapq.merge(*walks, key=_newest_first)
    shown = (live(task) for task in itertools.islice(merged, limit or None))
    # A running task that ended since its record was read is shown as it is now.
    if set(wanted) != set(JobStatus):
        shown = (task for task in shown if task.status in wanted)
    return shown


def _newest_first(task: Task) -> tuple:
    # heapq.merge wants ascending keys: negate the time; ids (same time) descending.
    return (-task.start_time.timestamp(), _Descending(task.id))


class _Descending(str):
    """A string that sorts the other way round (ids, newest-first order)."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)
