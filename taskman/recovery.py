"""Crash recovery: the records of an earlier life of the server, made final.

A task still STARTED in the store was running when the server stopped
without ending it (a crash, SIGKILL, power loss). Its main process is told
apart from a stranger that reused its pid by the start time recorded at
spawn (boot id and clock ticks, which no task can change), never by its
environment, which the task controls (``exec env -i`` wipes it). If still
alive, it is killed through a pidfd with its process group: SIGNALED by
SIGKILL, source ``server``; the log says whether it was still in its
task's cgroups (/proc/<pid>/cgroup). The cgroup driver's setup(), which runs after
recovery, kills whatever else is left in the task's groups. If the process
is already gone, its exit status is lost: UNKNOWN, source ``server``.
"""

import logging
import signal
from typing import Callable, Dict, FrozenSet, Iterable

from taskman import host
from taskman.output import reopen_log
from taskman.task import JobStatus, Source, Task, now

log = logging.getLogger("taskman.recovery")


def recover(records: Iterable[Task], output_dir: str, save: Callable[[Task], None],
            started: Dict[str, str] = None, adopted: FrozenSet[str] = frozenset()) -> int:
    """End each task of ``records`` (those still STARTED in the store: only
    they need it; finished records stay on disk, unread); return how many.

    ``started``: task id -> start identity of its main process
    (``host.start_identity``, as the store kept it). Each task's new record,
    with the size of its output, is passed to ``save``. Must run before the
    cgroup driver's setup(): that kills what is left in the groups, and a
    task whose process it killed first would be UNKNOWN. ``adopted``: ids of
    tasks a reload handed over (still running, still ours): left out.
    """
    started = started or {}
    ended = 0
    for task in records:
        if task.id in adopted or not task.running:
            continue
        _end(task, started.get(task.id, ""))
        task.output_size = reopen_log(output_dir, task.id).size
        save(task)
        ended += 1
    return ended


def _end(task: Task, identity: str) -> None:
    """Kill what is left of a task that was running; record how it ended."""
    pidfd = host.find_leftover(task.pid, identity)
    if pidfd is not None:
        log.info("task %s: main process %d found %s", task.id, task.pid,
                 "in its cgroups" if host.in_task_group(task.pid, task.id)
                 else "outside any cgroup of the task (the none driver, or it left them)")
        host.kill_leftover(task.pid, pidfd)
        task.status, task.exit_code = JobStatus.SIGNALED, 128 + signal.SIGKILL
        task.signal = "SIGKILL"
    else:
        task.status, task.exit_code, task.signal = JobStatus.UNKNOWN, None, ""
    task.source, task.end_time = Source.SERVER, now()
    log.warning("task %s was running when the server stopped: recorded as %s",
                task.id, task.status.name)
