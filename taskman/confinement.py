"""Which sandbox each user's tasks get, and whether a task stayed in its groups.

The manager's side of the sandbox (``taskman.sandbox`` is the policy and the
gate's command line, ``taskman.users`` the identity -> uid registry): the
uid an identity runs as is recorded in the store, with each task, so the
records say who ran what; and a task's main process found outside its
cgroups is reported, since no task should be able to leave them
(docs/security.md).
"""

import functools
import logging
import os
import time
from typing import Dict, Optional

import gevent

from taskman import host
from taskman.cgroups import Group
from taskman.sandbox import UNCONFINED, Sandbox, in_gate
from taskman.store import TaskStore

log = logging.getLogger("taskman.confinement")

# The manager's listeners hear this event when a task left its groups.
ESCAPED = "escaped"
# How long a gate may take to join its groups (the first cgroup.procs write
# after a quiet spell waits for an RCU grace period: a few ms, more under load).
JOIN_WAIT = 1.0


class Confinement:
    """identity -> Sandbox through ``users`` (a taskman.users.Users), recorded
    in ``store``; with no ``users``, every task runs as the server's own user."""

    def __init__(self, users, store: TaskStore):
        self.users = users
        self.store = store
        self._recorded: Dict[str, int] = {}

    def sandbox_for(self, identity: str) -> Sandbox:
        """The identity's sandbox; raises as taskman.users.Users.sandbox_for."""
        if self.users is None:
            return UNCONFINED
        sandbox = self.users.sandbox_for(identity)
        if self._recorded.get(identity) != sandbox.uid:
            try:
                before = self.store.save_user(identity, sandbox.uid)
            except Exception as error:  # noqa: BLE001 - sqlite3 raises many kinds
                log.error("task store: cannot record the uid of %s: %s", identity, error)
            else:
                self._recorded[identity] = sandbox.uid
                if before is not None:
                    log.warning("identity %s now runs as uid %d (uid %d before)",
                                identity, sandbox.uid, before)
        return sandbox


def environment(task_id: str, owner: str, search_path: str) -> dict:
    """A small, predictable environment: never the server's own (it holds
    settings and possibly secrets of the server). The sandbox sets HOME for
    a confined task (taskman.sandbox.Sandbox.environment)."""
    env = {"PATH": search_path, "HOME": _server_home(),
           "TASKMAN_TASK_ID": task_id, "TASKMAN_USER": owner}
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


@functools.lru_cache(maxsize=None)
def _server_home() -> str:
    # Once: a passwd lookup per start cost more than the rest of the environment.
    return host.home_directory()


def uid_of(sandbox: Sandbox) -> int:
    """The uid a task of ``sandbox`` runs as (the server's own when unconfined)."""
    return sandbox.uid if sandbox.confined else os.geteuid()


def left_group(group: Optional[Group], pid: int, identity: str) -> bool:
    """True if the live process ``pid`` (start ``identity``) is missing from
    one of the task's groups. False without groups (the ``none`` driver).

    A task's first process joins its groups itself, in the gate, just after
    the start's reply (taskman.sandbox): while it is still the gate it is
    given up to JOIN_WAIT to finish (a stop sent at once must reach it
    through its groups), and is not taken for an escape.
    """
    directories = getattr(group, "directories", None)
    if not directories or not host.is_running(pid, identity):
        return False
    deadline = time.monotonic() + JOIN_WAIT
    while True:
        inside = sum(group.task_id in path.split("/") for path in host.cgroup_paths(pid))
        if inside >= len(directories):
            return False
        if not in_gate(pid) or time.monotonic() > deadline:
            return host.is_running(pid, identity)
        gevent.sleep(0.002)
