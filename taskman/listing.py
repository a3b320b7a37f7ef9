"""Which tasks a listing shows: the owner and status filters and the pages.

Read from the store, so listing costs the page, not the history: every task
has a record there from its start, finished ones only there. An index walk
(``TaskStore.newest``; one per status when filtered, merged) yields the
records newest first, so a page reads about its own rows whatever the store
holds.
"""

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
    wanted = set(statuses)
    before = None
    if after:
        before = store.position(parse_task_id(after))
        if before is None:
            raise InvalidArgument(GONE)
    records = store.newest(wanted, owner or None, before)
    shown = (live(task) for task in itertools.islice(records, limit or None))
    if wanted:
        # A running task that ended since its record was read is shown as it is now.
        shown = (task for task in shown if task.status in wanted)
    return shown
