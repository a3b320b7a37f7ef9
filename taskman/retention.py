"""Retention: which finished tasks to forget, and how often to look.

A finished task keeps its record and output on disk until it is forgotten:
once it ended longer ago than the retention age, or, oldest first, while the
output of all finished tasks exceeds the disk budget, or while its user keeps
more finished records than their quota. This module chooses and
keeps time; the manager, which owns the tasks, forgets what it is told to
(the record in memory and in the store, and the output file).
"""

import logging
from typing import Callable, Iterable

import gevent

from taskman.task import now

log = logging.getLogger("taskman.retention")

DEFAULT_AGE = 7 * 24 * 3600.0
DEFAULT_BUDGET = 10 * 1024 ** 3
SWEEP_INTERVAL = 60.0


def select(entries: Iterable, age: float, budget: int, finished_bytes: int) -> list:
    """The entries to forget now, oldest first.

    ``entries`` are the manager's (each with ``task``, ``ended`` and ``log``);
    only finished ones that nobody is reading are candidates. Those that ended
    more than ``age`` seconds ago go, then the oldest others while
    ``finished_bytes`` (the output of every finished task) is over ``budget``.
    0 disables either rule.
    """
    finished = sorted((entry for entry in entries
                       if entry.ended.is_set() and not entry.log.in_use), key=_ended_at)
    doomed = []
    if age:
        horizon = now().timestamp() - age
        doomed = [entry for entry in finished if _ended_at(entry).timestamp() < horizon]
    if budget:
        total = finished_bytes - sum(entry.log.size for entry in doomed)
        for entry in finished:
            if total <= budget:
                break
            if entry not in doomed:
                total -= entry.log.size
                doomed.append(entry)
    return doomed


def past_record_quota(entries: Iterable, doomed: list,
                      records_to_forget: Callable[[str, int], int]) -> list:
    """Each user's oldest finished entries past their finished-records quota,
    besides those already ``doomed``.

    ``records_to_forget(user, finished)`` says how many of ``user``'s
    ``finished`` records to drop (``Quotas.records_to_forget``). Records
    being read are kept, as for the other rules: the user is then briefly
    over the quota.
    """
    going = set(map(id, doomed))
    finished: dict = {}
    for entry in entries:
        if entry.ended.is_set() and id(entry) not in going:
            finished.setdefault(entry.task.owner, []).append(entry)
    extra = []
    for user, kept in finished.items():
        excess = records_to_forget(user, len(kept))
        if excess:
            idle = sorted((entry for entry in kept if not entry.log.in_use), key=_ended_at)
            extra.extend(idle[:excess])
    return extra


def sweep_periodically(prune: Callable[[], int], age: float) -> None:
    """Call ``prune`` forever; run it in a greenlet of its own and kill it to stop.

    Often enough that nothing outlives its retention age by more than a
    quarter of it (the disk budget is checked as each task ends). A failing
    pass is logged, never raised: retention must not kill the server.
    """
    interval = SWEEP_INTERVAL
    if age:
        interval = max(0.25, min(interval, age / 4))
    while True:
        gevent.sleep(interval)
        try:
            prune()
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("retention pass failed")


def _ended_at(entry):
    # No end time only if supervision failed before it could record one.
    return entry.task.end_time or entry.task.start_time
