"""What this host offers: mounted cgroup hierarchies, the server's own
cgroup in each, and the block devices that back a path.

Only reads; deciding which driver fits is ``select_driver``'s job.
"""

import dataclasses
import os
from typing import Dict, Iterable, List, Optional, Tuple

from taskman.cgroups import cgroupfs
from taskman.errors import CgroupError

PROC_MOUNTS = "/proc/self/mounts"
PROC_CGROUP = "/proc/self/cgroup"
SYS_BLOCK = "/sys/block"
SYS_DEV_BLOCK = "/sys/dev/block"

# Options of a v1 mount that are not controllers.
_NOT_CONTROLLERS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
                    "nsdelegate", "clone_children", "noprefix", "xattr", "cpuset_v2_mode"}


@dataclasses.dataclass
class Host:
    """The cgroup mounts and the server's place in them."""

    v2_mount: Optional[str]            # where cgroup2 is mounted, if anywhere
    v2_own: str                        # the server's cgroup there ("0::" line)
    v1_mounts: Dict[str, str]          # controller → mount point
    v1_own: Dict[str, str]             # controller → the server's cgroup in it

    def v2_controllers(self) -> List[str]:
        """Controllers the server's own v2 cgroup could hand to children."""
        if not self.v2_mount:
            return []
        path = os.path.join(self.v2_mount, self.v2_own.lstrip("/"), "cgroup.controllers")
        try:
            return cgroupfs.read(path).split()
        except CgroupError:
            return []


def host() -> Host:
    """Read the mounts and /proc/self/cgroup; CgroupError if they are unreadable."""
    v2_mount = None
    v1_mounts: Dict[str, str] = {}
    for line in cgroupfs.read(PROC_MOUNTS).splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount_point, kind, options = _unescape(fields[1]), fields[2], fields[3].split(",")
        if kind == "cgroup2" and v2_mount is None:
            v2_mount = mount_point
        elif kind == "cgroup":
            for option in options:
                if option not in _NOT_CONTROLLERS and "=" not in option:
                    v1_mounts.setdefault(option, mount_point)
    v2_own = "/"
    v1_own: Dict[str, str] = {}
    for line in cgroupfs.read(PROC_CGROUP).splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:
            v2_own = path
        else:
            for controller in controllers.split(","):
                v1_own[controller] = path
    return Host(v2_mount, v2_own, v1_mounts, v1_own)


def backing_devices(paths: Iterable[str]) -> Tuple[str, ...]:
    """The whole disks ("MAJ:MIN") holding the file systems of ``paths``.

    A partition is replaced by its disk: the kernel's IO throttling works on
    whole request queues and refuses a partition's number. A path on no
    block device (tmpfs, or the overlay root of a container) is skipped; if
    no path has one, every real disk of the host is used (a file system
    layered over them is backed by one of them). Raises CgroupError when the
    host has no disk at all: the operator must then name the device.
    """
    devices: List[str] = []
    for path in paths:
        number = os.stat(path).st_dev
        disk = whole_disk(f"{os.major(number)}:{os.minor(number)}")
        if disk is not None and disk not in devices:
            devices.append(disk)
    if not devices:
        devices = host_disks()
    if not devices:
        raise CgroupError(
            f"cannot find a block device for the IO limits: {', '.join(paths)} are on no "
            f"block device and the host has no disk; name it with --io-device MAJ:MIN "
            f"(lsblk shows them) or set the IO limits to 0")
    return tuple(devices)


def host_disks() -> List[str]:
    """"MAJ:MIN" of every disk backed by hardware (not loop, ram or zram)."""
    disks = []
    for name in sorted(os.listdir(SYS_BLOCK)):
        directory = os.path.join(SYS_BLOCK, name)
        if os.path.exists(os.path.join(directory, "device")):
            disks.append(cgroupfs.read(os.path.join(directory, "dev")).strip())
    return disks


def whole_disk(device: str) -> Optional[str]:
    """``device`` ("MAJ:MIN") itself if it is a disk, its disk if it is a
    partition, None if no such block device exists."""
    link = os.path.join(SYS_DEV_BLOCK, device)
    if not os.path.exists(link):
        return None
    real = os.path.realpath(link)
    if os.path.exists(os.path.join(real, "partition")):
        return cgroupfs.read(os.path.join(os.path.dirname(real), "dev")).strip()
    return device


def check_devices(devices: Iterable[str]) -> None:
    """CgroupError unless every "MAJ:MIN" names an existing whole disk."""
    for device in devices:
        parts = device.split(":")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise CgroupError(f"IO device {device!r} is not of the form MAJ:MIN (e.g. 254:0)")
        disk = whole_disk(device)
        if disk is None:
            raise CgroupError(f"IO device {device} does not exist on this host "
                              f"(see lsblk for the MAJ:MIN of its disks)")
        if disk != device:
            raise CgroupError(f"IO device {device} is a partition; IO limits apply to "
                              f"whole disks: use {disk}")


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal."""
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))
