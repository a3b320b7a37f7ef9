"""Retention: which finished tasks to forget, and how often to look.

A finished task keeps its record and output on disk until it is forgotten:
once it ended longer ago than the retention age, or, oldest first, while the
output of all finished tasks exceeds the disk budget, or while its user keeps
more finished records than their quota. This module chooses and
keeps time, reading the candidates from the store (never walking every
record); ``taskman.history`` forgets what it is told to (the record in the
store, the output files, the totals).
"""

import collections
import itertools
import logging
from typing import Callable, Dict, List

import gevent

from taskman.task import now

log = logging.getLogger("taskman.retention")

DEFAULT_AGE = 7 * 24 * 3600.0
DEFAULT_BUDGET = 10 * 1024 ** 3
SWEEP_INTERVAL = 60.0


def select(store, age: float, budget: int, finished_bytes: int,
           in_use: Callable[[str], bool], limit: int) -> List[tuple]:
    """The finished records to forget now, as (id, owner, output size), at
    most ``limit``, oldest first.

    Read from ``store`` (a TaskStore) through its end-time index, only as
    far as needed; records whose output someone is reading (``in_use(id)``)
    are spared. Those that ended more than ``age`` seconds ago go, then the
    oldest others while ``finished_bytes`` (the output of every finished
    task) is over ``budget``. 0 disables either rule.
    """
    doomed = []
    if age:
        expired = store.ended_before(now().timestamp() - age)
        doomed = list(itertools.islice((row for row in expired if not in_use(row[0])), limit))
    if budget and len(doomed) < limit:
        total = finished_bytes - sum(size for _, _, size in doomed)
        going = {row[0] for row in doomed}
        rows = store.oldest_ended()
        while total > budget and len(doomed) < limit:
            row = next(rows, None)
            if row is None:
                break
            if row[0] not in going and not in_use(row[0]):
                total -= row[2]
                doomed.append(row)
    return doomed


def past_record_quota(store, finished: Dict[str, int], doomed: list,
                      records_to_forget: Callable[[str, int], int],
                      in_use: Callable[[str], bool], limit: int) -> List[tuple]:
    """Each user's oldest finished records past their finished-records quota,
    besides those already ``doomed``, at most ``limit``.

    ``finished``: user -> their finished records kept. ``records_to_forget(user,
    finished)`` says how many of ``user``'s ``finished`` records to drop
    (``Quotas.records_to_forget``). Records being read are kept, as for the
    other rules: the user is then briefly over the quota.
    """
    going = {row[0] for row in doomed}
    leaving = collections.Counter(owner for _, owner, _ in doomed)
    extra: List[tuple] = []
    for user, count in list(finished.items()):
        excess = min(records_to_forget(user, count - leaving[user]), limit - len(extra))
        if excess > 0:
            idle = (row for row in store.oldest_ended(user)
                    if row[0] not in going and not in_use(row[0]))
            extra.extend(itertools.islice(idle, excess))
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

