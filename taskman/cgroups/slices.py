"""Per-user slices: the group each user's task groups live in, its name, and
the aggregate limits on it and on the driver's whole root.

Layout: ``<root>/user-<key>/<task id>``. The key is the uid the user's tasks
run as (``user-70001``), or, when no uid is known (the ``none`` sandbox, or an
identity mapped to root), an escaped form of the identity
(``user-name-client001``). Neither can collide with a task id (a UUID), with a
control file (``cgroup.procs``, ``memory.max``: they never start with
``user-``) or with each other (a uid key is digits only, a name key starts with
``name-``), whatever the user is called.

Why slices: the kernel shares CPU between sibling groups by weight, so with one
group per user a user's 60 tasks compete with another user's one task as one
group against one group, not 60 against 1; and a slice's memory and pids
limits bound everything its tasks use together.
"""

import dataclasses
import os
import re
from typing import Optional

from taskman.cgroups.driver import Limits
from taskman.errors import CgroupError, InvalidArgument

PREFIX = "user-"
NAME_KEY = "name-"
# NAME_MAX is 255 bytes; a longer escaped identity is refused, not cut (two
# cut names could be equal).
MAX_NAME = 255
_KEPT = re.compile(r"[A-Za-z0-9.@-]")
_UID_SLICE = re.compile(r"user-[0-9]+")
_NAME_SLICE = re.compile(r"user-name-(?:[A-Za-z0-9.@-]|_[0-9a-f]{2})+")

MiB = 1 << 20
# What the host keeps for itself: the root's memory is total RAM minus this.
MEMORY_RESERVE_MIN = 1 << 30
MEMORY_RESERVE_FRACTION = 10  # percent of total RAM, if more than the minimum
PIDS_RESERVE_MIN = 1024
USER_PIDS_MAX = 8192
# The tasks' CPU weight against the server's, on systemd's CPUWeight scale
# (1-10000, a service's default 100): under contention every task together
# gets a tenth of what the server gets (docs/operations.md).
TASKS_CPU_WEIGHT = 10
CPU_WEIGHT_MIN, CPU_WEIGHT_MAX, CPU_WEIGHT_DEFAULT = 1, 10000, 100


@dataclasses.dataclass(frozen=True)
class Owner:
    """Whose slice a task group goes into: the identity (certificate CN) and
    the uid its tasks run as, if known."""

    identity: str
    uid: Optional[int] = None

    @property
    def slice_name(self) -> str:
        return slice_name(self.identity, self.uid)


def slice_name(identity: str, uid: Optional[int] = None) -> str:
    """``user-<uid>``, or ``user-name-<identity escaped>`` without a uid.

    The escape keeps letters, digits, ``.``, ``@`` and ``-``; every other byte
    (``_`` included, so the escape is reversible) becomes ``_`` and two hex
    digits. Raises CgroupError if the result is longer than a file name may be.
    """
    if uid is not None:
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            raise CgroupError(f"cannot name a slice after uid {uid!r}")
        return f"{PREFIX}{uid}"
    if not identity:
        raise CgroupError("cannot name a slice after an empty identity")
    escaped = "".join(character if _KEPT.fullmatch(character) else
                      "".join(f"_{byte:02x}" for byte in character.encode("utf-8"))
                      for character in identity)
    name = PREFIX + NAME_KEY + escaped
    if len(name) > MAX_NAME:
        raise CgroupError(f"cannot name a slice after {identity[:64]!r}...: the identity is "
                          f"too long for a cgroup name")
    return name


def is_slice_name(name: str) -> bool:
    """True for names ``slice_name`` makes: what start-up clean-up may enter."""
    return bool(_UID_SLICE.fullmatch(name) or _NAME_SLICE.fullmatch(name))


@dataclasses.dataclass(frozen=True)
class SliceLimits:
    """Aggregate limits: on each user's slice, and on the whole root (every
    task of every user together). ``Limits`` fields, 0 meaning no limit;
    ``io_devices`` is ignored here (the task limits' devices are used)."""

    user: Limits
    root: Limits
    # Every task together against the server, for a CPU both want: the
    # root's cpu.shares on v1, each slice's cpu.weight on v2 (where the
    # server's leaf is the slices' sibling). 0: the kernel's default.
    cpu_weight: int = TASKS_CPU_WEIGHT

    def __post_init__(self):
        weight = self.cpu_weight
        if (not isinstance(weight, int) or isinstance(weight, bool)
                or (weight and not CPU_WEIGHT_MIN <= weight <= CPU_WEIGHT_MAX)):
            raise InvalidArgument(f"--tasks-cpu-weight must be 0 (the kernel's default) or "
                                  f"{CPU_WEIGHT_MIN} to {CPU_WEIGHT_MAX}, not {weight!r}")


def v1_shares(weight: int) -> int:
    """cpu.shares for a CPUWeight, as systemd maps them (100 is 1024)."""
    return max(2, weight * 1024 // CPU_WEIGHT_DEFAULT)


def unlimited() -> Limits:
    return Limits(cpu_quota_us=0, memory_max=0, io_read_bps=0, io_write_bps=0, pids_max=0)


def default_slice_limits(meminfo: str = "/proc/meminfo",
                         pid_max: str = "/proc/sys/kernel/pid_max") -> SliceLimits:
    """Defaults that keep the host alive, computed from this machine.

    Root: memory is total RAM minus a reserve (10%, at least 1 GiB), pids are
    pid_max minus a quarter (at least 1024) so the host can still fork. Each
    user: half the root's memory and pids (at most USER_PIDS_MAX), so one user
    cannot take it all. CPU and IO: no aggregate cap (0): every task has its
    own, and sibling slices share CPU equally under contention.
    """
    total = _memory_total(meminfo)
    reserve = max(MEMORY_RESERVE_MIN, total * MEMORY_RESERVE_FRACTION // 100)
    root_memory = max(total - reserve, total // 2) // MiB * MiB
    maximum = _read_int(pid_max)
    root_pids = maximum - max(PIDS_RESERVE_MIN, maximum // 4)
    if root_pids <= 0:
        root_pids = maximum // 2
    root = dataclasses.replace(unlimited(), memory_max=root_memory, pids_max=root_pids)
    user = dataclasses.replace(unlimited(), memory_max=root_memory // 2 // MiB * MiB,
                               pids_max=min(root_pids // 2, USER_PIDS_MAX))
    return SliceLimits(user=user, root=root)


def check_cpu_nesting(task: Limits, slices: SliceLimits) -> None:
    """Raise InvalidArgument if a CPU quota is larger than its parent's.

    cgroup v1 refuses (EINVAL) a child whose quota/period exceeds its
    parent's, so on hybrid hosts every task would fail to start: say so at
    start instead, naming the options.
    """
    chain = [("--cpu-quota-us", task), ("--user-cpu-quota-us", slices.user),
             ("--root-cpu-quota-us", slices.root)]
    for index, (child_option, child) in enumerate(chain):
        for parent_option, parent in chain[index + 1:]:
            # An unlimited child is fine: v1 gives it its parent's quota.
            if not parent.cpu_quota_us or not child.cpu_quota_us:
                continue
            if child.cpu_quota_us * parent.cpu_period_us > parent.cpu_quota_us * child.cpu_period_us:
                raise InvalidArgument(
                    f"{child_option} {child.cpu_quota_us} per "
                    f"{child.cpu_period_us} us is more CPU than {parent_option} "
                    f"{parent.cpu_quota_us} per {parent.cpu_period_us} us; cgroup v1 refuses "
                    f"a group more CPU than its parent")


def _memory_total(path: str) -> int:
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as error:
        raise CgroupError(f"cannot read the machine's memory from {path}: {error}") from None
    raise CgroupError(f"cannot read the machine's memory from {path}: no MemTotal line")


def _read_int(path: str) -> int:
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().strip())
    except (OSError, ValueError) as error:
        raise CgroupError(f"cannot read {path}: {error}") from None


def user_directory(base: str, name: str) -> str:
    """The slice ``name`` under ``base``; CgroupError for a name slice_name would not make."""
    if not is_slice_name(name):
        raise CgroupError(f"refusing a slice named {name!r}")
    return os.path.join(base, name)
