"""Which tasks a listing shows: the owner and status filters and the pages."""

import itertools
from typing import Dict, Iterable, Iterator, Optional

from taskman.errors import InvalidArgument
from taskman.task import JobStatus, parse_task_id


def select(entries: Dict[str, object], owner: Optional[str], statuses: Iterable[JobStatus],
           limit: int, after: Optional[str]) -> Iterator:
    """The entries (anything with a ``.task``) of ``entries`` (task id ->
    entry, oldest first) to list, newest first.

    ``owner`` narrows to one user's (None or "": everyone's), ``statuses``
    to those states (empty: all); ``limit`` caps the count (0: all);
    ``after`` continues a listing after that task (InvalidArgument if it is
    gone, e.g. removed by retention).
    """
    wanted = set(statuses)
    listed = reversed(entries.values())
    if after:
        after = parse_task_id(after)
        if after not in entries:
            raise InvalidArgument("the listing's page token is no longer valid "
                                  "(its task was removed): list again")
        listed = itertools.dropwhile(lambda entry: entry.task.id != after, listed)
        next(listed)
    matching = (entry for entry in listed
                if (not owner or entry.task.owner == owner)
                and (not wanted or entry.task.status in wanted))
    return itertools.islice(matching, limit or None)
