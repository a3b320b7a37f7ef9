"""Stopping a task: the signals a stop sends, and whether the stop is what
ended the task.

The manager decides when to stop (a user's request, the server's shutdown);
this module sends the signals and, when the task has ended, says who ended
it. Both must tolerate a task that ended meanwhile: a stop request and the
task's own exit race, and the manager drops a finished task's process and
group objects (``entry.process``/``entry.group`` become None).
"""

import logging
import os
import signal
from typing import Callable

from taskman import confinement
from taskman.task import Source

log = logging.getLogger("taskman.manager")


def terminate(entry, driver, grace: float, notify: Callable, safely: Callable) -> None:
    """SIGTERM the whole task, SIGKILL it after ``grace`` seconds (at once if 0).

    A main process that left its groups (reported as an ``escaped`` event
    through ``notify``) gets SIGTERM through its pidfd instead; one still in
    them gets it once, with its group (a second SIGTERM reads as "force quit"
    to many programs). SIGKILL goes both ways. A task
    that already ended is left alone: this runs in a greenlet of its own, which
    may start after the task's supervisor has recorded the end.
    """
    proc, group = entry.process, entry.group
    if proc is None or entry.ended.is_set():
        return  # ended before the stop got here: nothing to signal
    escaped = confinement.left_group(group, proc.pid, proc.start_identity)
    if escaped:
        log.warning("task %s: its main process %d is outside the task's cgroups",
                    entry.task.id, proc.pid)
        notify(confinement.ESCAPED, entry.task.snapshot())
    if grace > 0:
        entry.sent_signal = signal.SIGTERM
        if group is not None:
            safely(driver.signal, group, signal.SIGTERM)
        if escaped or group is None:
            proc.signal(signal.SIGTERM)
        if proc.wait(grace) is not None:
            return  # the supervisor kills whatever is left
    entry.sent_signal = signal.SIGKILL
    kill(entry, driver, safely)


def kill(entry, driver, safely: Callable) -> None:
    """SIGKILL the task's group and main process, if it still has them."""
    proc, group = entry.process, entry.group
    if group is not None:
        safely(driver.kill, group)
    if proc is not None:
        proc.signal(signal.SIGKILL)


def ended_by(entry, wait_status: int) -> Source:
    """Who ended the task, as far as a stop goes: the stop's source, or NONE.

    The rule: a requested stop ended the task only if the task ended *because
    of* a signal the stop sent. That is, it died of the signal last sent
    (SIGTERM in the grace, SIGKILL after it), or of the SIGTERM sent before
    an escalation to SIGKILL, or it exited by itself after a signal was sent
    (it handled SIGTERM and left within the grace). A task that ended before
    the stop sent anything, or died of another signal (the OOM killer's
    SIGKILL during the grace of a SIGTERM, someone's SIGINT), did not end by
    the stop: the caller then looks for the usual causes (OOM, SYSTEM).
    """
    source, sent = entry.stop_source, entry.sent_signal
    if source is None or not sent:
        return Source.NONE
    if os.WIFSIGNALED(wait_status):
        died_of = os.WTERMSIG(wait_status)
        if died_of == sent or (died_of == signal.SIGTERM and sent == signal.SIGKILL):
            return source
        return Source.NONE
    return source
