"""Crash recovery: the records of an earlier life of the server, made final.

A task still STARTED in the store was running when the server stopped
without ending it (a crash, SIGKILL, power loss). Its main process, if still
alive (told apart from a reused pid by the TASKMAN_TASK_ID in its
environment), is killed with its process group: SIGNALED by SIGKILL, source
``server``. The cgroup driver's setup(), which runs after recovery, kills
whatever else is left in the task's groups. If the process is already gone,
its exit status is lost: UNKNOWN, source ``server``.
"""

import logging
import signal
from typing import Callable, Iterable, List, Tuple

from taskman import host
from taskman.output import OutputLog, reopen_log
from taskman.task import JobStatus, Source, Task, now

log = logging.getLogger("taskman.recovery")


def recover(records: Iterable[Task], output_dir: str,
            save: Callable[[Task], None]) -> List[Tuple[Task, OutputLog]]:
    """Each task of ``records`` with its output log, every one of them finished.

    A task found running is ended and its new record passed to ``save``.
    Must run before the cgroup driver's setup(): that kills what is left in
    the groups, and a task whose process it killed first would be UNKNOWN.
    """
    recovered = []
    for task in records:
        if task.running:
            _end(task)
            save(task)
        output = reopen_log(output_dir, task.id)
        output.dropped, output.write_error = task.output_dropped, task.output_note or None
        recovered.append((task, output))
    return recovered


def _end(task: Task) -> None:
    """Kill what is left of a task that was running; record how it ended."""
    if host.is_process_of(task.pid, task.id):
        host.kill_process_group(task.pid)
        task.status, task.exit_code = JobStatus.SIGNALED, 128 + signal.SIGKILL
        task.signal = "SIGKILL"
    else:
        task.status, task.exit_code, task.signal = JobStatus.UNKNOWN, None, ""
    task.source, task.end_time = Source.SERVER, now()
    log.warning("task %s was running when the server stopped: recorded as %s",
                task.id, task.status.name)
