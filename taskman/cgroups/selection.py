"""Which driver fits this host: ``select_driver`` turns what detect.py reads
into a driver, or refuses (fail closed) rather than run tasks unlimited.
"""

import os
from typing import Optional, Tuple

from taskman.cgroups import detect, hybrid, slices, v2
from taskman.cgroups.driver import Driver, Limits
from taskman.cgroups.none import ProcessGroupDriver
from taskman.errors import CgroupError

DEFAULT_ROOT = "taskman"
KINDS = ("auto", "v2", "hybrid", "none")

_FAIL_CLOSED = ("refusing to run tasks without resource limits: {reason}. Run the server "
                "as root on a host with cgroup v2 (cpu, memory, io, pids delegated to its "
                "cgroup) or with cgroup v1 (cpu, memory, blkio, pids, freezer), or start it "
                "with --cgroup-driver none to run tasks WITHOUT limits")


def select_driver(kind: str = "auto", limits: Optional[Limits] = None,
                  root: Optional[str] = None, io_paths: Tuple[str, ...] = ("/",),
                  slice_limits: Optional[slices.SliceLimits] = None) -> Driver:
    """Return the driver for ``kind``: auto, v2, hybrid or none.

    ``none`` (process-group tracking, no limits) only when asked for. ``root``
    names the directory beneath the server's own cgroup that holds task
    groups (default ``taskman``; two servers on one host need two names).
    Without ``limits.io_devices`` the IO limits apply to the disks holding
    ``io_paths`` (pass the state directory too). The driver is not yet set
    up: the manager calls ``setup()``. ``slice_limits`` bound each user's
    slice and the whole root (default: ``slices.default_slice_limits()``,
    computed from this machine's memory and pid_max).

    Raises InvalidArgument for limits no kernel takes (``Limits.validate``),
    CgroupError when this host cannot enforce them, or a configured IO device
    does not exist.
    """
    if kind not in KINDS:
        raise CgroupError(f"unknown cgroup driver {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "none":
        return ProcessGroupDriver()
    limits = limits or Limits()
    limits.validate()  # made valid, but a caller may have forced a field since
    if slice_limits is None:
        slice_limits = slices.default_slice_limits()
    slice_limits.user.validate()
    slice_limits.root.validate()
    root = root or DEFAULT_ROOT
    if root in (".", "..") or "/" in root or "\0" in root:
        raise CgroupError(f"cgroup root name {root!r} must be a single directory name")
    if limits.io_devices:
        detect.check_devices(limits.io_devices)
        devices = tuple(limits.io_devices)
    elif any(each.io_read_bps or each.io_write_bps
             for each in (limits, slice_limits.user, slice_limits.root)):
        devices = detect.backing_devices(io_paths)
    else:
        devices = ()

    host = detect.host()
    v2_ready = all(name in host.v2_controllers() for name in v2.CONTROLLERS)
    hybrid_missing = hybrid.missing_controllers(host)
    if kind == "auto":
        if v2_ready:
            kind = "v2"
        elif not hybrid_missing:
            kind = "hybrid"
        else:
            raise CgroupError(_FAIL_CLOSED.format(
                reason=f"neither cgroup v2 controllers ({', '.join(v2.CONTROLLERS)}) nor "
                       f"cgroup v1 controllers ({', '.join(hybrid.CONTROLLERS)}) are all "
                       f"available (v1 missing: {', '.join(hybrid_missing)})"))
    if kind == "v2":
        if not v2_ready:
            raise CgroupError(_FAIL_CLOSED.format(
                reason=f"cgroup v2 controllers {', '.join(v2.CONTROLLERS)} are not all "
                       f"available to the server's cgroup {host.v2_own}"))
        own_directories = [os.path.join(host.v2_mount, host.v2_own.lstrip("/"))]
        driver: Driver = v2.V2Driver(limits, root, devices, host.v2_mount, host.v2_own,
                                     slice_limits=slice_limits)
    else:
        if hybrid_missing:
            raise CgroupError(_FAIL_CLOSED.format(
                reason=f"cgroup v1 controllers {', '.join(hybrid_missing)} are not mounted"))
        slices.check_cpu_nesting(limits, slice_limits)
        own_directories = hybrid.own_directories(host)
        driver = hybrid.HybridDriver(host, limits, root, devices, slice_limits)
    for directory in own_directories:
        if not os.access(directory, os.W_OK):
            raise CgroupError(_FAIL_CLOSED.format(
                reason=f"no permission to create groups in {directory} (uid {os.geteuid()})"))
    return driver
