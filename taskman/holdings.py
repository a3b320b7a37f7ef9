"""What each user holds on the server, for the quotas' ``measure``.

Counted from the manager's public API, without scanning every user's tasks
on every start: a listener keeps each user's task ids (seeded once from the
listing at start, then from "started" events), and ``measure`` looks at that
user's tasks only, dropping the ids retention has forgotten since.
"""

import threading
from typing import Dict, List

from taskman.errors import NotFound
from taskman.quotas import Measured


class Holdings:
    """Each user's tasks on a manager, once ``attach``ed to it.

    Made before the manager (the server's one Quotas, which the manager
    takes, measures through it); measures nothing until attached.
    """

    def __init__(self):
        self.manager = None
        self.admin = ""
        self._lock = threading.Lock()
        self._ids: Dict[str, Dict[str, None]] = {}  # user -> task ids, oldest first

    def attach(self, manager, admin: str) -> None:
        """Count ``manager``'s tasks from now on, seen through ``admin`` (a
        name in ``manager.admins``, who may look at every task)."""
        self.manager, self.admin = manager, admin
        manager.listeners.append(self.task_event)
        for task in reversed(manager.tasks(admin)):  # newest first -> oldest first
            self._add(task.owner, task.id)

    def task_event(self, event: str, task) -> None:
        """A manager listener: remember each started task under its owner."""
        if event == "started":
            self._add(task.owner, task.id)

    def users(self) -> List[str]:
        """The users who have tasks the server still knows, sorted."""
        with self._lock:
            return sorted(self._ids)

    def measure(self, user: str) -> Measured:
        """``user``'s running tasks, finished records, output bytes on disk
        (running tasks included) and largest running command line."""
        if self.manager is None:
            return Measured()
        with self._lock:
            ids = list(self._ids.get(user, ()))
        running = finished = output = largest = 0
        for task_id in ids:
            try:
                task = self.manager.status(self.admin, task_id)
            except NotFound:  # forgotten by retention
                self._forget(user, task_id)
                continue
            output += task.output_size
            if task.running:
                running += 1
                size = argument_bytes(task.command, task.args)
                largest = max(largest, size)
            else:
                finished += 1
        return Measured(running_tasks=running, finished_records=finished,
                        output_bytes=output, largest_arguments=largest)

    def _add(self, user: str, task_id: str) -> None:
        with self._lock:
            self._ids.setdefault(user, {})[task_id] = None

    def _forget(self, user: str, task_id: str) -> None:
        with self._lock:
            ids = self._ids.get(user)
            if ids is not None:
                ids.pop(task_id, None)
                if not ids:
                    del self._ids[user]


def argument_bytes(command: str, args) -> int:
    """The bytes a command line takes, as the argument quota counts them
    (each argument with its terminating NUL, like the kernel's ARG_MAX)."""
    return _size(command) + sum(_size(argument) + 1 for argument in args)


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))
