"""The driver for pure cgroup v2 hosts (the RFD's target).

Layout, ``<own>`` being the server's cgroup from /proc/self/cgroup's ``0::``
line and ``taskman`` the configurable root name::

    <mount>/<own>/                    subtree_control: +cpu +memory +io +pids
    <mount>/<own>/taskman/            subtree_control: +cpu +memory +io +pids
    <mount>/<own>/taskman/server/     the server process itself (a leaf)
    <mount>/<own>/taskman/<task id>/  cpu.max, memory.max, memory.swap.max, io.max, pids.max
    <mount>/<own>/taskman/user-<key>/            the same files: one user's aggregate limits;
                                                 subtree_control: +cpu +memory +io +pids
    <mount>/<own>/taskman/user-<key>/<task id>/  a task of that user (see slices.py)

The base (``taskman``) gets the root's aggregate limits; the ``server`` leaf
is inside it, so the server's own memory counts against the root's.

Why the server moves: v2's "no internal processes" rule forbids enabling
controllers in ``subtree_control`` of a non-root group that holds processes.
So at setup the server moves itself (its pid, which takes all its threads;
never any other process) from ``<own>`` into the ``server`` leaf, and only
then enables the controllers on ``<own>`` and ``taskman``. If other processes
still live in ``<own>`` the kernel refuses (EBUSY): the server moves back and
refuses to start; run it in a cgroup of its own (a systemd unit with
``Delegate=yes`` gives exactly that). If ``<own>`` is the root cgroup, which
the rule exempts, nothing moves and there is no ``server`` leaf.

Each op: place writes cgroup.procs; kill writes cgroup.kill (else freezes
with cgroup.freeze and SIGKILLs each process); emptiness is
cgroup.events ``populated 0``; OOM is memory.events ``oom_kill``.

Without limits (``limits=None``) the driver only tracks and kills: it needs
no controllers, which is what a controller-less cgroup2 mount (as on hybrid
hosts) offers.
"""

import os
from typing import List, Optional, Tuple

from taskman.cgroups import cgroupfs
from taskman.cgroups.driver import Limits
from taskman.cgroups.hierarchy import Hierarchy, HierarchyDriver, Setting
from taskman.cgroups.slices import SliceLimits
from taskman.errors import CgroupError

CONTROLLERS = ("cpu", "memory", "io", "pids")
SERVER_LEAF = "server"
MOUNT = "/sys/fs/cgroup"


class V2Driver(HierarchyDriver):
    name = "v2"

    def __init__(self, limits: Optional[Limits], root: str, devices: Tuple[str, ...] = (),
                 mount: str = MOUNT, own: str = "/", slice_limits: Optional[SliceLimits] = None):
        self.mount = mount
        # A server restarted inside the leaf an earlier run moved into (the
        # one place of its delegated group that can still take a process)
        # belongs to the group above: else it nests a new tree in the leaf
        # and never finds the earlier run's task groups.
        parts = own.strip("/").split("/")
        if parts[-2:] == [root, SERVER_LEAF]:
            own = "/" + "/".join(parts[:-2])
        self.own_directory = os.path.join(mount, own.lstrip("/"))
        self.is_root = own.strip("/") == ""
        if limits is None:
            slice_limits = None  # tracking only: no controllers to limit with
        settings = v2_settings(limits, devices) if limits is not None else ()
        slice_settings = v2_settings(slice_limits.user, devices) if slice_limits else ()
        root_settings = v2_settings(slice_limits.root, devices) if slice_limits else ()
        if slice_limits and slice_limits.cpu_weight:
            # The server's leaf is the slices' sibling (or, in the root
            # cgroup, the base's): the weight goes on both, so every task
            # together stays behind the server either way.
            weight = (Setting("cpu.weight", str(slice_limits.cpu_weight)),)
            slice_settings, root_settings = (tuple(slice_settings) + weight,
                                             tuple(root_settings) + weight)
        hierarchy = Hierarchy("unified", os.path.join(self.own_directory, root), 2,
                              tuple(settings), tuple(slice_settings), tuple(root_settings),
                              oom_file="memory.events" if limits is not None else None,
                              freezer_file="cgroup.freeze")
        super().__init__([hierarchy], limits, devices, slice_limits)
        self.controllers = CONTROLLERS if limits is not None else ()
        self.server_leaf: Optional[str] = None

    def _prepare(self, hierarchy: Hierarchy) -> None:
        if not self.controllers:
            cgroupfs.make_directory(hierarchy.base)
            return
        available = cgroupfs.read(os.path.join(self.own_directory, "cgroup.controllers")).split()
        missing = [name for name in self.controllers if name not in available]
        if missing:
            raise CgroupError(f"cgroup controllers {', '.join(missing)} are not available "
                              f"in {self.own_directory} (not delegated to the server's cgroup)")
        made_base = cgroupfs.make_directory(hierarchy.base)
        if self.is_root:
            self._enable(self.own_directory)  # the root may hold processes
        else:
            self._move_into_leaf(hierarchy.base, made_base)  # enables own_directory
        self._enable(hierarchy.base)

    def _move_into_leaf(self, base: str, made_base: bool) -> None:
        leaf = os.path.join(base, SERVER_LEAF)
        made_leaf = cgroupfs.make_directory(leaf)
        cgroupfs.write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        try:
            self._enable(self.own_directory)
        except CgroupError:
            # Put things back as they were: the server in its own group.
            cgroupfs.write(os.path.join(self.own_directory, "cgroup.procs"), str(os.getpid()))
            for directory, made in ((leaf, made_leaf), (base, made_base)):
                if made:
                    cgroupfs.remove_directory(directory)
            raise
        self.server_leaf = leaf

    def _enable(self, directory: str) -> None:
        path = os.path.join(directory, "cgroup.subtree_control")
        enabled = cgroupfs.read(path).split()
        wanted = [name for name in self.controllers if name not in enabled]
        if not wanted:
            return
        try:
            cgroupfs.write(path, " ".join("+" + name for name in wanted))
        except CgroupError as error:
            others = sorted(cgroupfs.pids([directory]) - {os.getpid()})
            if others:
                raise CgroupError(
                    f"{error}: the server's cgroup {directory} also holds processes "
                    f"{', '.join(map(str, others[:10]))}; run the server in a cgroup of its "
                    f"own (e.g. a systemd unit with Delegate=yes)") from None
            raise

    def _prepare_slice(self, hierarchy: Hierarchy, directory: str) -> None:
        if self.controllers:
            self._enable(directory)  # a slice holds groups, never processes

    def _is_own_leaf(self, hierarchy: Hierarchy, name: str) -> bool:
        return name == SERVER_LEAF

    def describe(self) -> str:
        where = self.hierarchies[0].base
        server = f"; server moved into {self.server_leaf}" if self.server_leaf else ""
        return (f"cgroup driver v2: task groups <task id> under {where}{server}; "
                f"limits: {self._limits_text()}; {self._slices_text()}")


def v2_settings(limits: Limits, devices: Tuple[str, ...]) -> List[Setting]:
    """The files a new v2 group gets; 0 in Limits means unlimited ("max")."""
    def value(number: int) -> str:
        return str(number) if number else "max"
    settings = [
        Setting("cpu.max", f"{value(limits.cpu_quota_us)} {limits.cpu_period_us}"),
        Setting("memory.max", value(limits.memory_max)),
        # No swap: a task's memory limit is its limit, as on v1 with memsw.
        Setting("memory.swap.max", "0", required=False),
        Setting("pids.max", value(limits.pids_max)),
    ]
    if limits.io_read_bps or limits.io_write_bps:
        for device in devices:
            settings.append(Setting("io.max", f"{device} rbps={value(limits.io_read_bps)} "
                                              f"wbps={value(limits.io_write_bps)}"))
    return settings
