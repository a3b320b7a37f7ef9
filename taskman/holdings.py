"""What each user holds on the server, for the quotas' ``measure``.

Kept up to date from the manager's task events, so a start does not walk
every running task of every user: each user's running tasks are kept apart
(``started`` adds, ``ended`` removes; a reload's adopted tasks are counted
once when attached), and the finished records and their output bytes come
from the manager's history's per-user totals, which the store sums once at
start and the history keeps up to date.
"""

from typing import Dict, List

from taskman.quotas import Measured


class Holdings:
    """Each user's holdings on a manager, once ``attach``ed to it.

    Made before the manager (the server's one Quotas, which the manager
    takes, measures through it); measures nothing until attached. Per user:
    its running tasks' entries (running count in O(1); the output bytes and
    the largest command line from the user's own running tasks, at most its
    running quota, never from everyone's).
    """

    def __init__(self):
        self.manager = None
        self.admin = ""
        self._running: Dict[str, Dict[str, object]] = {}  # user -> task id -> manager entry

    def attach(self, manager, admin: str) -> None:
        """Count ``manager``'s tasks from now on (``admin``: kept for callers):
        those it runs already (a reload's adopted tasks) and, through its
        listeners, every one it starts or ends after."""
        self.manager, self.admin = manager, admin
        self._running = {}
        for entry in list(manager.entries()):
            if entry.task.running:
                self._add(entry)
        manager.listeners.append(self.task_event)

    def task_event(self, event: str, task) -> None:
        """A manager listener: keep each user's running tasks."""
        if event == "started":
            entry = self.manager.entry(task.id)
            if entry is not None:  # None: it ended before its listeners heard it started
                self._add(entry)
        elif event == "ended":
            tasks = self._running.get(task.owner)
            if tasks is not None:
                tasks.pop(task.id, None)
                if not tasks:
                    del self._running[task.owner]  # users come and go: no empty entries

    def users(self) -> List[str]:
        """The users who have tasks the server still knows, sorted."""
        if self.manager is None:
            return []
        return sorted(set(self._running) | set(self.manager.history.records))

    def measure(self, user: str) -> Measured:
        """``user``'s running tasks, finished records, output bytes on disk
        (running tasks included) and largest running command line."""
        if self.manager is None:
            return Measured()
        running = list(self._running.get(user, {}).values())
        output = sum(entry.log.size for entry in running)
        largest = max((argument_bytes(entry.task.command, entry.task.args) for entry in running),
                      default=0)
        history = self.manager.history
        return Measured(running_tasks=len(running), finished_records=history.records.get(user, 0),
                        output_bytes=output + history.bytes.get(user, 0), largest_arguments=largest)

    def _add(self, entry) -> None:
        self._running.setdefault(entry.task.owner, {})[entry.task.id] = entry


def argument_bytes(command: str, args) -> int:
    """The bytes a command line takes, as the argument quota counts them
    (each argument with its terminating NUL, like the kernel's ARG_MAX)."""
    return _size(command) + sum(_size(argument) + 1 for argument in args)


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))
