"""The driver for hybrid hosts: limits from cgroup v1 controllers, tracking
and killing through the controller-less cgroup v2 ("unified") hierarchy.

Layout (``<own>`` is the server's cgroup in that hierarchy, from
/proc/self/cgroup; the root name defaults to ``taskman``)::

    /sys/fs/cgroup/cpu/<own>/taskman/<task id>       cpu.cfs_period_us, cpu.cfs_quota_us
    /sys/fs/cgroup/memory/<own>/taskman/<task id>    memory.limit_in_bytes (+ memsw: no swap)
    /sys/fs/cgroup/blkio/<own>/taskman/<task id>     blkio.throttle.{read,write}_bps_device
    /sys/fs/cgroup/pids/<own>/taskman/<task id>      pids.max
    /sys/fs/cgroup/freezer/<own>/taskman/<task id>   freeze-then-kill when cgroup.kill is missing
    /sys/fs/cgroup/unified/<own>/taskman/<task id>   cgroup.procs, cgroup.kill, cgroup.events

With an owner, each ``<task id>`` is ``user-<key>/<task id>`` (slices.py): the
slice gets the user's aggregate limits in the same files, the base
(``taskman``) the root's. v1 enforces a parent's limit on its children only
with ``memory.use_hierarchy`` 1, which modern kernels always have (measured
on 6.18: it reads 1 and writing 0 is refused, EINVAL); CPU quotas must nest (a child may not
have more than its parent: EINVAL), which select_driver checks at start.

Groups are made beneath the server's own cgroups, never elsewhere: the
server may itself sit in a group the machine owns, and nothing is ever moved
out of it. Nothing needs moving here: v1 has no rule against processes in
inner groups, and the unified hierarchy enables no controllers.
"""

import os
from typing import Dict, List, Optional, Tuple

from taskman.cgroups.detect import Host
from taskman.cgroups.driver import Limits
from taskman.cgroups.hierarchy import Hierarchy, HierarchyDriver, Setting
from taskman.cgroups.slices import SliceLimits, v1_shares

# The v1 controllers the driver needs, in the order groups are made.
CONTROLLERS = ("cpu", "memory", "blkio", "pids", "freezer")


class HybridDriver(HierarchyDriver):
    name = "hybrid"

    def __init__(self, host: Host, limits: Limits, root: str, devices: Tuple[str, ...] = (),
                 slice_limits: Optional[SliceLimits] = None):
        hierarchies: List[Hierarchy] = []
        if host.v2_mount:
            hierarchies.append(Hierarchy("unified", _base(host.v2_mount, host.v2_own, root), 2))
        by_mount: Dict[str, List[str]] = {}
        for controller in CONTROLLERS:
            by_mount.setdefault(host.v1_mounts[controller], []).append(controller)
        for mount, controllers in by_mount.items():
            own = host.v1_own.get(controllers[0], "/")
            settings: List[Setting] = []
            slice_settings: List[Setting] = []
            root_settings: List[Setting] = []
            for controller in controllers:
                settings.extend(v1_settings(controller, limits, devices))
                if slice_limits is not None:
                    slice_settings.extend(v1_settings(controller, slice_limits.user, devices,
                                                      aggregate=True))
                    root_settings.extend(v1_settings(controller, slice_limits.root, devices,
                                                     aggregate=True))
                if controller == "cpu" and slice_limits is not None and slice_limits.cpu_weight:
                    # The root is the server's child or sibling here: one
                    # weight puts every task together behind it.
                    root_settings.append(Setting("cpu.shares",
                                                 str(v1_shares(slice_limits.cpu_weight))))
            hierarchies.append(Hierarchy(
                ",".join(controllers), _base(mount, own, root), 1, tuple(settings),
                tuple(slice_settings), tuple(root_settings),
                oom_file="memory.oom_control" if "memory" in controllers else None,
                freezer_file="freezer.state" if "freezer" in controllers else None))
        super().__init__(hierarchies, limits, devices, slice_limits)
        self.host = host

    def describe(self) -> str:
        unified = (f"cgroup.kill/events from {self.hierarchies[0].base}"
                   if self.hierarchies[0].version == 2 else "no cgroup2: freezer kill")
        v1 = " ".join(hierarchy.base for hierarchy in self.hierarchies if hierarchy.version == 1)
        return (f"cgroup driver hybrid (v1 {','.join(CONTROLLERS)}; {unified}): "
                f"task groups <task id> under {v1}; limits: {self._limits_text()}; "
                f"{self._slices_text()}")


def v1_settings(controller: str, limits: Limits, devices: Tuple[str, ...],
                aggregate: bool = False) -> List[Setting]:
    """The files a new v1 group gets for ``controller``; 0 in Limits means unlimited.

    ``aggregate``: for a slice or the root, which may exist from an earlier
    run with other values; memsw is lifted first so that any new memory
    limit is accepted (memsw must never be below memory)."""
    if controller == "cpu":
        return [Setting("cpu.cfs_period_us", str(limits.cpu_period_us)),
                Setting("cpu.cfs_quota_us", str(limits.cpu_quota_us or -1))]
    if controller == "memory":
        memory = str(limits.memory_max or -1)
        # memsw limits memory plus swap; equal to the memory limit means the
        # task cannot spill into swap. Written second: memsw ≥ memory always.
        lifted = [Setting("memory.memsw.limit_in_bytes", "-1", required=False)] if aggregate else []
        return lifted + [Setting("memory.limit_in_bytes", memory),
                Setting("memory.memsw.limit_in_bytes", memory, required=False)]
    if controller == "pids":
        return [Setting("pids.max", str(limits.pids_max or "max"))]
    if controller == "blkio":
        settings = []
        for device in devices:
            if limits.io_read_bps:
                settings.append(Setting("blkio.throttle.read_bps_device",
                                        f"{device} {limits.io_read_bps}"))
            if limits.io_write_bps:
                settings.append(Setting("blkio.throttle.write_bps_device",
                                        f"{device} {limits.io_write_bps}"))
        return settings
    return []


def missing_controllers(host: Host) -> List[str]:
    return [controller for controller in CONTROLLERS if controller not in host.v1_mounts]


def own_directories(host: Host) -> List[str]:
    """The server's own group in each hierarchy this driver uses."""
    directories = [os.path.join(host.v1_mounts[controller],
                                host.v1_own.get(controller, "/").lstrip("/"))
                   for controller in CONTROLLERS]
    if host.v2_mount:
        directories.insert(0, os.path.join(host.v2_mount, host.v2_own.lstrip("/")))
    return directories


def _base(mount: str, own: Optional[str], root: str) -> str:
    return os.path.join(mount, (own or "/").lstrip("/"), root)
