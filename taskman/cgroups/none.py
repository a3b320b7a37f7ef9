"""The driver for hosts without usable cgroups: no limits, tracking by session.

Chosen only when the operator asks (``--cgroup-driver none``). Each task leads
its own session and process group, so signals reach its whole tree unless a
descendant starts a new session of its own, which this driver cannot follow.
"""

import os
from typing import Optional

from taskman.cgroups.driver import Driver, Group
from taskman.cgroups.slices import Owner


class ProcessGroupDriver(Driver):
    name = "none"

    def create(self, task_id: str, owner: Optional[Owner] = None) -> Group:
        return Group(task_id)  # no groups, so no slices: users share one host

    def place(self, group: Group, pid: int) -> None:
        group.pid = pid  # spawn made it a session and group leader already

    def signal(self, group: Group, number: int) -> None:
        if group.pid:
            try:
                os.killpg(group.pid, number)
            except ProcessLookupError:
                pass

    def is_empty(self, group: Group) -> bool:
        if not group.pid:
            return True
        try:
            os.killpg(group.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def describe(self) -> str:
        return ("none: NO resource limits, tasks tracked by process group only "
                "(a task that calls setsid() escapes stop)")
