"""A manager's task groups: made ahead of demand, emptied and removed off the event loop.

Why: making a task's groups (on a hybrid host a directory in six hierarchies
and its limit files) and removing them are each a few hundred microseconds
of kernel work. On the gevent loop they held up every other user's calls,
and at start they were on the caller's path. Here they run in a thread of
their own, whose syscalls release the GIL, so the loop keeps serving; and
for each user who started a task lately a few groups wait ready, each named
after the id its task will get, limits written: a start takes one and the
refill follows, off its path.

What stays true: a warm group is made by the driver's own ``create``, in the
user's slice with every limit, before any process is in it; only the task's
process is ever placed in it. A user idle for ``IDLE_SECONDS`` keeps none (so
their slice goes with their last task), at most ``MAX_OWNERS`` users keep
any, and shutdown removes them all; after a crash or a reload the driver's
start-up clean-up removes them like any group of the earlier run (they are
named like task groups).

The ready groups are off by default (TaskManager's ``warm_groups=0``): named
like task groups, they showed in every listing of the hierarchy as groups of
no task, and the reliability suite's "nothing half-made is left behind"
checks failed on them. Naming them apart (and renaming at the take) would
let them be turned on; the thread for creates and removes serves either way.

Two worker threads: one makes groups (and removes emptied slices), one
removes task groups. A start then never waits behind the previous task's
removal (it did, ~4 ms of a back-to-back start, with one thread), and the
driver's slice lock is still only ever taken by one thread. A user's slice
outlives their last task by ``SLICE_LINGER`` seconds, so a user starting
tasks one after another does not make and remove it around each (about
0.5 ms of cgroup work per start on a hybrid host); shutdown removes it at
once.
"""

import collections
import logging
import time
import uuid
from typing import Deque, Dict, Optional, Set, Tuple

import gevent
import gevent.event
import gevent.threadpool

from taskman.cgroups import Driver, Group
from taskman.cgroups.slices import Owner
from taskman.errors import CgroupError

log = logging.getLogger("taskman.groups")

# Ready groups per user: enough for a burst of starts while the refill runs.
WARM_PER_OWNER = 4
MAX_OWNERS = 16
IDLE_SECONDS = 30.0
# How long an emptied user slice is kept for that user's next task.
SLICE_LINGER = 1.0
# After the main process exits and its group is killed, the pipe reaches end
# of file within milliseconds; a group still populated after this is logged.
GROUP_EMPTY_TIMEOUT = 10.0


class TaskGroups:
    """The groups of one manager's tasks through ``driver``; ``warm``: ready
    groups kept per user (0: none, every group is made at its start)."""

    def __init__(self, driver: Driver, warm: int = 0):
        self.driver = driver
        self.warm = warm if driver.costly else 0
        self._worker = gevent.threadpool.ThreadPool(1)  # creates; emptied slices' removal
        self._remover = gevent.threadpool.ThreadPool(1)  # task groups' removal
        self._lingering: Dict[str, Group] = {}  # slice name -> a group that was in it
        self._ready: Dict[Owner, Deque[Group]] = {}
        self._used: "collections.OrderedDict[Owner, float]" = collections.OrderedDict()
        self._filling: Set = set()  # owners refilled, slices being removed, in the worker
        self._closed = False
        self._sweeper = gevent.spawn(self._sweep) if warm else None

    def create(self, owner: Owner, task_id: Optional[str] = None) -> "Making":
        """Begin making a group for a new task of ``owner``: a ready one
        unless ``task_id`` is given, else made in the worker while the
        caller goes on (its task id is ``task_id`` of what is returned, the
        group its ``get()``, which raises CgroupError). A caller that gives
        up before ``get()`` hands it to ``abandon``."""
        group = None
        if self.warm and task_id is None and not self._closed:
            self._used[owner] = time.monotonic()
            self._used.move_to_end(owner)
            ready = self._ready.get(owner)
            if ready:
                group = ready.popleft()
        if group is not None:
            making = Making(group.task_id, gevent.event.AsyncResult())
            making.result.set(group)
        else:
            new_id = task_id or str(uuid.uuid4())
            making = Making(new_id, self._begin(self.driver.create, new_id, owner))
        if self.warm and task_id is None and not self._closed:
            self._refill(owner)
        return making

    def abandon(self, making: "Making") -> None:
        """Remove the group of a start that failed (made or not yet)."""
        try:
            group = making.get()
        except CgroupError:
            return
        self.discard(group)

    def joining(self, group: Group) -> Tuple[str, ...]:
        """The files the task's first process writes itself into (the gate,
        before its command runs): where the driver has them, placing a task
        is none of the server's work."""
        return self.driver.procs_files(group)

    def place(self, group: Group, pid: int) -> None:
        """``pid`` is the task's first process: moved into ``group`` here
        unless it joins it itself (``joining``); raises CgroupError.

        Why the gate joins rather than the server writing the pid: on cgroup
        v1 the first write to a cgroup.procs after a quiet spell waits for an
        RCU grace period (4-5 ms here), and on the loop that held every call
        and the start's reply; in a thread the hop cost more than the writes
        (the thread waits for the GIL at every syscall). See docs/design.md.
        """
        if self.driver.procs_files(group):
            group.pid = pid
        else:
            self.driver.place(group, pid)

    def kill(self, group: Group) -> bool:
        """SIGKILL everything in the group and wait (bounded) until it is
        empty; False if processes survived."""
        with gevent.Timeout(GROUP_EMPTY_TIMEOUT, False):
            while not self.safely(self.driver.is_empty, group, default=True):
                self.safely(self.driver.kill, group)
                gevent.sleep(0.005)
            return True
        log.error("task %s: processes survived SIGKILL for %ss", group.task_id,
                  GROUP_EMPTY_TIMEOUT)
        return False

    def discard(self, group: Group, emptied: bool = False) -> None:
        """Remove the task's groups, first emptying them unless ``emptied``."""
        if not emptied:
            self.kill(group)
        try:
            if self.driver.costly and not self._closed:
                self._remover.apply(self.driver.remove_groups, (group,))
            else:
                self.driver.remove_groups(group)
        except CgroupError as error:
            log.error("task %s: %s", group.task_id, error)
        self._release_slice(group)

    def safely(self, method, group: Group, *args, default=False):
        """Call a driver method during clean-up, logging instead of raising."""
        try:
            return method(group, *args)
        except (CgroupError, OSError) as error:
            log.error("task %s: %s failed: %s", group.task_id, method.__name__, error)
            return default

    def close(self) -> None:
        """Remove every ready group (the server is stopping); later creates
        make their group at once."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.kill()
        for owner in list(self._ready):
            self._drain(owner)
        while self._filling:  # a refill in the worker: it drains its own group
            gevent.sleep(0.005)
        lingering, self._lingering = list(self._lingering.values()), {}
        for group in lingering:
            self.safely(self.driver.remove_slice, group)
        self._worker.kill()
        self._remover.kill()

    def _begin(self, method, *args) -> gevent.event.AsyncResult:
        """``method(*args)`` begun in the worker thread where the driver's
        work is costly, else done here (the ``none`` driver's groups are a
        pid; after ``close``, a start under way when the server stopped)."""
        if self.driver.costly and not self._closed:
            return self._worker.spawn(method, *args)
        result = gevent.event.AsyncResult()
        try:
            result.set(method(*args))
        except Exception as error:  # noqa: BLE001 - handed to whoever gets it
            result.set_exception(error)
        return result

    # -- slices

    def _release_slice(self, group: Group) -> None:
        """Remove the slice ``group`` was in once no task is left in it:
        after ``SLICE_LINGER`` (at once after ``close``), in the worker that
        makes groups, so no group is being made in it meanwhile."""
        name = getattr(group, "slice_name", None)
        if name is None:
            return
        if self._closed or not self.driver.costly:
            self.safely(self.driver.remove_slice, group)
        elif name not in self._lingering:
            self._lingering[name] = group
            gevent.spawn_later(SLICE_LINGER, self._remove_slice, name)

    def _remove_slice(self, name: str) -> None:
        # Out of the table before the removal is queued: a task of the slice
        # ending from now on queues another, after the one below.
        group = self._lingering.pop(name, None)
        if group is not None and not self._closed:
            self._filling.add(name)  # close() waits for it, as for a refill
            try:
                self._worker.apply(self.driver.remove_slice, (group,))
            except (CgroupError, OSError) as error:
                log.error("removing the slice %s: %s", name, error)
            finally:
                self._filling.discard(name)

    # -- the warm pool

    def _refill(self, owner: Owner) -> None:
        if owner not in self._filling:
            self._filling.add(owner)
            gevent.spawn(self._fill, owner)
        while len(self._used) > MAX_OWNERS:
            oldest = next(iter(self._used))
            del self._used[oldest]
            gevent.spawn(self._drain, oldest)

    def _fill(self, owner: Owner) -> None:
        try:
            ready = self._ready.setdefault(owner, collections.deque())
            while len(ready) < self.warm and self._wanted(owner):
                group = self._worker.apply(self.driver.create, (str(uuid.uuid4()), owner))
                if not self._wanted(owner) or self._ready.get(owner) is not ready:
                    self._remove(group)  # drained while it was being made
                    return
                ready.append(group)
        except Exception as error:  # noqa: BLE001 - a start makes its group itself then
            log.warning("cannot make a group ahead for %s: %s", owner.identity, error)
        finally:
            self._filling.discard(owner)

    def _wanted(self, owner: Owner) -> bool:
        return not self._closed and owner in self._used

    def _sweep(self) -> None:
        while True:
            gevent.sleep(IDLE_SECONDS / 2)
            horizon = time.monotonic() - IDLE_SECONDS
            for owner, used in list(self._used.items()):
                if used < horizon:
                    del self._used[owner]
                    self._drain(owner)

    def _drain(self, owner: Owner) -> None:
        ready = self._ready.pop(owner, None)
        while ready:
            self._remove(ready.popleft())

    def _remove(self, group: Group) -> None:
        try:
            self._remover.apply(self.driver.remove_groups, (group,))
        except CgroupError as error:
            log.error("removing a ready group of %s: %s", group.task_id, error)
        self._release_slice(group)


class Making:
    """A task's group on its way (``TaskGroups.create``)."""

    def __init__(self, task_id: str, result: gevent.event.AsyncResult):
        self.task_id = task_id
        self.result = result

    def get(self) -> Group:
        """The group, once made; raises what making it raised."""
        return self.result.get()
