"""What each user holds on the server, for the quotas' ``measure``.

Counted from the manager's public state, with nothing kept per task: running
tasks from the manager's entries (the running tasks only), finished records
and their output bytes from its history's per-user totals, which the store
sums once at start and the history keeps up to date.
"""

from typing import List

from taskman.quotas import Measured


class Holdings:
    """Each user's holdings on a manager, once ``attach``ed to it.

    Made before the manager (the server's one Quotas, which the manager
    takes, measures through it); measures nothing until attached. Running
    tasks are counted from the manager's entries (running tasks only), the
    finished ones from its history's per-user totals: nothing per task.
    """

    def __init__(self):
        self.manager = None
        self.admin = ""

    def attach(self, manager, admin: str) -> None:
        """Count ``manager``'s tasks from now on (``admin``: kept for callers)."""
        self.manager, self.admin = manager, admin

    def users(self) -> List[str]:
        """The users who have tasks the server still knows, sorted."""
        if self.manager is None:
            return []
        running = {entry.task.owner for entry in list(self.manager.entries())}
        return sorted(running | set(self.manager.history.records))

    def measure(self, user: str) -> Measured:
        """``user``'s running tasks, finished records, output bytes on disk
        (running tasks included) and largest running command line."""
        if self.manager is None:
            return Measured()
        running = output = largest = 0
        for entry in list(self.manager.entries()):
            task = entry.task
            if task.owner != user:
                continue
            output += entry.log.size
            if task.running:
                running += 1
                largest = max(largest, argument_bytes(task.command, task.args))
        history = self.manager.history
        return Measured(running_tasks=running, finished_records=history.records.get(user, 0),
                        output_bytes=output + history.bytes.get(user, 0), largest_arguments=largest)


def argument_bytes(command: str, args) -> int:
    """The bytes a command line takes, as the argument quota counts them
    (each argument with its terminating NUL, like the kernel's ARG_MAX)."""
    return _size(command) + sum(_size(argument) + 1 for argument in args)


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))
