"""Each user's output quota, applied to tasks that are still writing.

A start is refused once its user's output on disk reaches the quota
(``Quotas.check_start``); tasks already running would go on writing. Rather
than ask the quota on every append (the output path is hot), a sweep every
second adds up each user's output and caps the running logs of a user over
the quota at their current size, with the cap's marker line (``OutputLog.cap``):
a user can overshoot by at most what their tasks write in a second.
"""

import logging
from typing import Callable, Dict, Iterable, List

import gevent

log = logging.getLogger("taskman.output_quota")

SWEEP_INTERVAL = 1.0


def sweep(entries: Iterable, quotas) -> int:
    """Cap the running logs of every user over the output quota; return how many.

    ``entries`` are the manager's (each with ``task``, ``ended`` and ``log``),
    running and finished: both count towards the quota.
    """
    totals: Dict[str, int] = {}
    writing: Dict[str, List] = {}
    for entry in entries:
        owner = entry.task.owner
        totals[owner] = totals.get(owner, 0) + entry.log.size
        if not entry.ended.is_set() and not entry.log.capped and not entry.log.finished:
            writing.setdefault(owner, []).append(entry)
    capped = 0
    for owner, running in writing.items():
        if not quotas.output_exceeded(owner, totals[owner]):
            continue
        for entry in running:
            entry.log.cap()
            capped += 1
        log.warning("%s: output quota reached (%d bytes on disk); output of %d running "
                    "task(s) no longer kept", owner, totals[owner], len(running))
    return capped


def sweep_periodically(entries: Callable[[], Iterable], quotas, closed: Callable[[], bool],
                       interval: float = SWEEP_INTERVAL) -> None:
    """``sweep`` every ``interval`` seconds until ``closed()``; run it in a
    greenlet of its own. A failing pass is logged, never raised."""
    while not closed():
        gevent.sleep(interval)
        try:
            sweep(list(entries()), quotas)
        except Exception:  # noqa: BLE001 - the sweep must not kill the server
            log.exception("output quota sweep failed")
