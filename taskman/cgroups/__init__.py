"""Per-task resource groups: one driver per kind of host.

The manager sees only the ``Driver`` interface below. ``select_driver``
detects the host and returns the driver that can enforce ``Limits`` there;
it refuses (``CgroupError``) rather than silently running tasks unlimited,
unless the operator asked for the ``none`` driver.
"""

import abc
import dataclasses
import signal
from typing import Optional, Tuple

from taskman.errors import CgroupError


@dataclasses.dataclass(frozen=True)
class Limits:
    """What each task may use. Defaults are the RFD's, plus a pids cap."""

    cpu_quota_us: int = 200_000  # per period: 20% of one CPU
    cpu_period_us: int = 1_000_000
    memory_max: int = 512 * 1024 * 1024
    io_read_bps: int = 268_435_456  # 256 MiB/s
    io_write_bps: int = 268_435_456
    io_devices: Tuple[str, ...] = ()  # "MAJ:MIN"; empty: the devices backing the host
    pids_max: int = 1024


class Group:
    """A task's groups; drivers subclass it to hold their paths."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        self.pid = 0  # the main process, once placed


class Driver(abc.ABC):
    """Creates, fills, signals and removes the groups of tasks.

    Every method but ``create``/``place`` is best effort against processes
    that vanish meanwhile: a process already gone is not an error.
    """

    name = "abstract"
    limits: Optional[Limits] = None

    def setup(self) -> int:
        """Prepare the driver's root; remove groups left by an earlier run of
        this server (killing their processes). Return how many were removed."""
        return 0

    @abc.abstractmethod
    def create(self, task_id: str) -> Group:
        """Make the task's groups with the limits applied; raise CgroupError."""

    @abc.abstractmethod
    def place(self, group: Group, pid: int) -> None:
        """Move ``pid`` (not yet running the command) into ``group``; raise CgroupError."""

    @abc.abstractmethod
    def signal(self, group: Group, number: int) -> None:
        """Send ``number`` to every process of the task."""

    def kill(self, group: Group) -> None:
        """SIGKILL every process of the task, including ones forking meanwhile."""
        self.signal(group, signal.SIGKILL)

    @abc.abstractmethod
    def is_empty(self, group: Group) -> bool:
        """True once no process of the task is left."""

    def oom_killed(self, group: Group) -> bool:
        """True if the kernel's OOM killer killed a process of this group."""
        return False

    def remove(self, group: Group) -> None:
        """Delete the (empty) groups; raise CgroupError if they stay."""

    def describe(self) -> str:
        """One line for the start-up log: the driver, where, which limits."""
        return self.name

    def close(self) -> None:
        """Release the driver's own resources (the server is stopping)."""


def select_driver(kind: str = "auto", limits: Optional[Limits] = None,
                  root: Optional[str] = None) -> Driver:
    """Return the driver for ``kind``: auto, v2, hybrid or none.

    ``none`` (process-group tracking, no limits) only when asked for.
    """
    from taskman.cgroups.none import ProcessGroupDriver

    if kind == "none":
        return ProcessGroupDriver()
    raise CgroupError(f"cgroup driver {kind!r} is not available on this host")
