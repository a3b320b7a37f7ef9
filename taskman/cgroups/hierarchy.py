"""Hierarchies of per-task directories, what the v2 and hybrid drivers
share: a task is one directory, named after its id, in each of a few cgroup
hierarchies; given an owner, inside that user's slice (``user-<key>``, see
slices.py), which is made with the task's group and removed with the last one
(``remove_slice``; the manager keeps it a moment for the user's next task).

A driver is a list of ``Hierarchy`` objects (where task groups live, which
limit files to write into each new group). Creating, placing, signalling,
killing, emptiness, OOM and removal then work the same on every layout; the
two drivers differ only in which hierarchies they list and how they prepare
them (see v2.py and hybrid.py).
"""

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Tuple

from taskman.cgroups import cgroupfs, slices
from taskman.cgroups.driver import Driver, Group, Limits
from taskman.errors import CgroupError
from taskman.task import is_task_id

log = logging.getLogger("taskman.cgroups")

# A freezer normally settles in 1-2 ms. A process in uninterruptible sleep
# (a throttled direct read, say) keeps it FREEZING: kill anyway after this.
FREEZE_TIMEOUT = 0.1
# setup(): how long a stale group from an earlier run may take to empty.
STALE_EMPTY_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """One value written into a new task group's ``file``; skipped if the
    file is absent and ``required`` is False (swap files without swap
    accounting)."""

    file: str
    value: str
    required: bool = True


@dataclasses.dataclass
class Hierarchy:
    """One mounted hierarchy and the directory in it that holds task groups."""

    name: str                     # "unified", "memory", "cpu,cpuacct"... for messages
    base: str                     # <mount>/<the server's own cgroup>/<root name>
    version: int                  # 1 or 2
    settings: Tuple[Setting, ...] = ()
    slice_settings: Tuple[Setting, ...] = ()  # written into each new user slice
    root_settings: Tuple[Setting, ...] = ()  # written into the base at setup
    oom_file: Optional[str] = None  # memory.events (v2) or memory.oom_control (v1)
    freezer_file: Optional[str] = None  # freezer.state (v1) or cgroup.freeze (v2)


class CgroupGroup(Group):
    """A task's directory in each hierarchy, by hierarchy name."""

    def __init__(self, task_id: str, directories: Dict[str, str],
                 slice_name: Optional[str] = None):
        super().__init__(task_id)
        self.directories = directories
        self.slice_name = slice_name


class HierarchyDriver(Driver):
    """The Driver operations over ``self.hierarchies``; see the module docstring."""

    # False: kill by freezing even where cgroup.kill exists, as on a kernel
    # before 5.14, so that path can be tested on a host that has both.
    use_cgroup_kill = True
    costly = True

    def __init__(self, hierarchies: List[Hierarchy], limits: Optional[Limits],
                 devices: Tuple[str, ...] = (),
                 slice_limits: Optional[slices.SliceLimits] = None):
        self.hierarchies = hierarchies
        self.limits = limits
        self.devices = devices
        self.slice_limits = slice_limits
        self._locks: List[int] = []
        # Held while a slice is made or removed together with a task group in
        # it, so a slice emptied by one task is not removed under the next.
        self._slice_lock = threading.Lock()
        self._optional: dict = {}  # a task group's optional files: present or not (``_write``)

    # -- start-up

    def setup(self, spare: frozenset = frozenset()) -> int:
        if not self._locks:
            try:
                for hierarchy in self.hierarchies:
                    self._prepare(hierarchy)
                    self._locks.append(cgroupfs.lock_directory(hierarchy.base))
            except BaseException:
                self._unlock()
                raise
        removed = self._remove_stale(spare)
        # After the clean-up: v1 refuses a root CPU quota below a child's.
        for hierarchy in self.hierarchies:
            for setting in hierarchy.root_settings:
                path = os.path.join(hierarchy.base, setting.file)
                if setting.required or cgroupfs.exists(path):
                    cgroupfs.write(path, setting.value)
        return removed

    def _prepare(self, hierarchy: Hierarchy) -> None:
        """Make the hierarchy's base directory (the server's own cgroup is its parent)."""
        cgroupfs.make_directory(hierarchy.base)

    def _remove_stale(self, spare: frozenset = frozenset()) -> int:
        """Kill and remove task groups an earlier run left under our bases,
        directly there or in a user slice; then the emptied slices. The
        groups of the tasks in ``spare`` (adopted by a reload) and their
        slices are kept.

        Only directories named like task ids or slices are touched: the bases
        are ours, but an operator's or another tool's directory there (or in
        a slice) is left alone, and so is the slice holding it.
        """
        stale = set()
        slice_names = set()
        kept_slices = set()
        for hierarchy in self.hierarchies:
            for name in cgroupfs.subgroups(hierarchy.base):
                if is_task_id(name):
                    if name not in spare:
                        stale.add((None, name))
                elif slices.is_slice_name(name):
                    slice_names.add(name)
                    for inner in cgroupfs.subgroups(os.path.join(hierarchy.base, name)):
                        if is_task_id(inner) and inner in spare:
                            kept_slices.add(name)
                        elif is_task_id(inner):
                            stale.add((name, inner))
                        else:
                            log.warning("leaving %s alone: not a task group",
                                        os.path.join(hierarchy.base, name, inner))
                elif not self._is_own_leaf(hierarchy, name):
                    log.warning("leaving %s alone: not a task group",
                                os.path.join(hierarchy.base, name))
        for slice_name, task_id in sorted(stale, key=lambda pair: (pair[0] or "", pair[1])):
            group = self._group(task_id, slice_name)
            deadline = time.monotonic() + STALE_EMPTY_TIMEOUT
            while not self.is_empty(group):
                if time.monotonic() > deadline:
                    raise CgroupError(f"processes of the earlier run's task {task_id} "
                                      f"survived SIGKILL for {STALE_EMPTY_TIMEOUT}s")
                self.kill(group)
                time.sleep(0.005)
            self.remove(group)
            log.info("removed task group %s left by an earlier run", task_id)
        for slice_name in sorted(slice_names - kept_slices):
            for hierarchy in self.hierarchies:
                directory = os.path.join(hierarchy.base, slice_name)
                if cgroupfs.exists(directory) and not cgroupfs.remove_if_unused(directory):
                    log.warning("leaving %s: it still holds something not ours", directory)
        return len(stale)

    def _is_own_leaf(self, hierarchy: Hierarchy, name: str) -> bool:
        return False

    def _group(self, task_id: str, slice_name: Optional[str] = None) -> CgroupGroup:
        def parent(hierarchy: Hierarchy) -> str:
            if slice_name is None:
                return hierarchy.base
            return slices.user_directory(hierarchy.base, slice_name)
        return CgroupGroup(task_id, {hierarchy.name: os.path.join(parent(hierarchy), task_id)
                                     for hierarchy in self.hierarchies}, slice_name)

    # -- a task's life

    def create(self, task_id: str, owner: Optional[slices.Owner] = None) -> Group:
        if not is_task_id(task_id):
            raise CgroupError(f"refusing to create a group named {task_id!r}: not a task id")
        group = self._group(task_id, owner.slice_name if owner is not None else None)
        made: List[str] = []
        with self._slice_lock:
            try:
                for hierarchy in self.hierarchies:
                    directory = group.directories[hierarchy.name]
                    # The user's slice is made when the group's mkdir finds
                    # it missing (ENOENT), not tried (EEXIST) before each
                    # group: a syscall fewer per hierarchy on most starts.
                    made_here = cgroupfs.make_directory(directory, parent_missing=owner is not None)
                    if made_here is None:
                        parent = os.path.dirname(directory)
                        if cgroupfs.make_directory(parent):
                            made.append(parent)
                            self._write(parent, hierarchy.slice_settings)
                            self._prepare_slice(hierarchy, parent)
                        made_here = cgroupfs.make_directory(directory)
                    if not made_here:
                        raise CgroupError(f"cannot create {directory}: it already exists")
                    made.append(directory)
                    self._write(directory, hierarchy.settings, self._optional)
            except BaseException:
                for directory in reversed(made):
                    try:
                        cgroupfs.remove_directory(directory)
                    except CgroupError as error:
                        log.error("task %s: cleaning up a half-made group: %s", task_id, error)
                raise
        return group

    @staticmethod
    def _write(directory: str, settings: Tuple[Setting, ...], optional: Optional[dict] = None) -> None:
        """Write ``settings``; one not required only where its file exists.
        ``optional``: whether it does, by file name, looked up once (a task
        group's files are the same in every group: the kernel's build and
        boot options decide, e.g. memsw with swap accounting)."""
        for setting in settings:
            path = os.path.join(directory, setting.file)
            if not setting.required:
                present = optional.get(setting.file) if optional is not None else None
                if present is None:
                    present = cgroupfs.exists(path)
                    if optional is not None:
                        optional[setting.file] = present
                if not present:
                    continue
            cgroupfs.write(path, setting.value)

    def _prepare_slice(self, hierarchy: Hierarchy, directory: str) -> None:
        """Make a new slice ready for task groups (v2 enables controllers)."""

    def place(self, group: Group, pid: int) -> None:
        for path in self.procs_files(group):
            cgroupfs.write(path, str(pid))
        group.pid = pid

    def procs_files(self, group: Group) -> Tuple[str, ...]:
        # The unified hierarchy first (it comes first in the list): the task
        # is tracked and killable from there as soon as it joins it.
        return tuple(os.path.join(directory, "cgroup.procs") for directory in self._directories(group))

    def signal(self, group: Group, number: int) -> None:
        cgroupfs.signal_listed(self._all_directories(group), number, first=group.pid)

    def kill(self, group: Group) -> None:
        """cgroup.kill where a hierarchy has it (atomic, follows forks);
        otherwise (or if ``use_cgroup_kill`` is False) freeze, SIGKILL every
        listed process, thaw."""
        for hierarchy, directory in self._pairs(group):
            if hierarchy.version == 2 and self.use_cgroup_kill:
                kill_file = os.path.join(directory, "cgroup.kill")
                if cgroupfs.exists(kill_file):
                    cgroupfs.write(kill_file, "1")
                    return
        for hierarchy, directory in self._pairs(group):
            if hierarchy.freezer_file and cgroupfs.exists(directory):
                self._freeze_and_kill(group, hierarchy, directory)
                return
        cgroupfs.signal_listed(self._all_directories(group), signal.SIGKILL)

    def _freeze_and_kill(self, group: Group, hierarchy: Hierarchy, directory: str) -> None:
        # Frozen processes cannot fork, so one pass over cgroup.procs gets
        # them all; SIGKILL takes effect when they thaw.
        state = os.path.join(directory, hierarchy.freezer_file)
        frozen, thawed = ("FROZEN", "THAWED") if hierarchy.version == 1 else ("1", "0")
        cgroupfs.write(state, frozen)
        try:
            deadline = time.monotonic() + FREEZE_TIMEOUT
            while not self._is_frozen(hierarchy, directory) and time.monotonic() < deadline:
                time.sleep(0.001)
            cgroupfs.signal_listed(self._all_directories(group), signal.SIGKILL)
        finally:
            cgroupfs.write(state, thawed)

    @staticmethod
    def _is_frozen(hierarchy: Hierarchy, directory: str) -> bool:
        if hierarchy.version == 1:
            return cgroupfs.read(os.path.join(directory, "freezer.state")).strip() == "FROZEN"
        return cgroupfs.keyed(os.path.join(directory, "cgroup.events")).get("frozen") == 1

    def is_empty(self, group: Group) -> bool:
        # A v2 group's "populated" covers its whole subtree, and every process
        # of the task is in every hierarchy (placed in all, children inherit,
        # and a task cannot move itself): when it says empty, the task is.
        # Listing the five v1 trees as well cost ~1 ms of the loop per task.
        pairs = self._pairs(group)
        for hierarchy, directory in pairs:
            if hierarchy.version == 2:
                events = os.path.join(directory, "cgroup.events")
                if cgroupfs.exists(events):
                    return not cgroupfs.keyed(events).get("populated", 0)
        return not any(cgroupfs.pids(cgroupfs.walk(directory)) for _, directory in pairs)

    def oom_killed(self, group: Group) -> bool:
        for hierarchy, directory in self._pairs(group):
            if not hierarchy.oom_file:
                continue
            # v2 memory.events counts the group's whole subtree; v1 counts
            # only where the victim was, so add up the groups a task made.
            directories = [directory] if hierarchy.version == 2 else cgroupfs.walk(directory)
            kills = 0
            for path in directories:
                events = os.path.join(path, hierarchy.oom_file)
                if cgroupfs.exists(events):
                    kills += cgroupfs.keyed(events).get("oom_kill", 0)
            if kills:
                return True
        return False

    def remove(self, group: Group) -> None:
        """Remove the task's groups, then its slice if no other task is in it
        (the kernel refuses to remove a slice that holds a group)."""
        try:
            self.remove_groups(group)
        finally:
            self.remove_slice(group)

    def remove_groups(self, group: Group) -> None:
        # Not under the slice lock: removing a task's directory cannot undo
        # a slice another thread is making (only ``remove_slice`` can).
        first_error = None
        for directory in reversed(self._directories(group)):
            try:
                cgroupfs.remove_directory(directory)
            except CgroupError as error:
                first_error = first_error or error
        if first_error:
            raise first_error

    def remove_slice(self, group: Group) -> None:
        if getattr(group, "slice_name", None) is None:
            return
        with self._slice_lock:
            for directory in reversed(self._directories(group)):
                cgroupfs.remove_if_unused(os.path.dirname(directory))

    def close(self) -> None:
        """Remove our base directories if no group is left in them (best
        effort), then let another server have them."""
        if self._locks:
            for hierarchy in self.hierarchies:
                # Kept if it still holds groups (or the server itself, on v2).
                cgroupfs.remove_if_unused(hierarchy.base)
        self._unlock()

    def _unlock(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    # -- helpers

    def _pairs(self, group: Group) -> List[Tuple[Hierarchy, str]]:
        assert isinstance(group, CgroupGroup)
        return [(hierarchy, group.directories[hierarchy.name]) for hierarchy in self.hierarchies]

    def _directories(self, group: Group) -> List[str]:
        return [directory for _, directory in self._pairs(group)]

    def _all_directories(self, group: Group) -> List[str]:
        """The task's groups and any group its processes made beneath them."""
        return [path for directory in self._directories(group) for path in cgroupfs.walk(directory)]

    def _limits_text(self, limits: Optional[Limits] = None) -> str:
        limits = limits or self.limits
        if limits is None:
            return "no limits (tracking only)"

        def amount(value, unit=""):
            return f"{value}{unit}" if value else "unlimited"
        cpu = (f"cpu {limits.cpu_quota_us}/{limits.cpu_period_us} us "
               f"({100 * limits.cpu_quota_us / limits.cpu_period_us:.0f}% of a CPU)"
               if limits.cpu_quota_us else "cpu unlimited")
        devices = ",".join(self.devices) or "-"
        io = (f"io on {devices} read {_mib(limits.io_read_bps)}/s "
              f"write {_mib(limits.io_write_bps)}/s"
              if limits.io_read_bps or limits.io_write_bps else "io unlimited")
        return (f"{cpu}, memory {_mib(limits.memory_max)} (no swap), {io}, "
                f"pids {amount(limits.pids_max)}")

    def _slices_text(self) -> str:
        """Where slices go and their limits, for describe()."""
        if self.slice_limits is None:
            return "user slices user-<key>/<task id>: no aggregate limits"
        weight = self.slice_limits.cpu_weight
        return (f"user slices user-<key>/<task id>; each user: "
                f"{self._limits_text(self.slice_limits.user)}; all tasks together: "
                f"{self._limits_text(self.slice_limits.root)}, cpu weight "
                f"{weight or 'the kernel default'} against the server's 100")


def _mib(value: int) -> str:
    if not value:
        return "unlimited"
    return f"{value / 1048576:g} MiB" if value % 1048576 == 0 else f"{value} B"
