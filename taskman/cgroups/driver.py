"""What the manager sees of cgroups: the ``Driver`` interface, the ``Group``
it hands back for each task, and the ``Limits`` every task gets.

Drivers implement it per kind of host (v2.py, hybrid.py, none.py);
selection.py picks one.
"""

import abc
import dataclasses
import signal
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Limits:
    """What each task may use. Defaults are the RFD's, plus a pids cap.

    A value of 0 means "no limit" for that resource. ``io_devices`` empty
    means the disks backing the host (see ``select_driver``).
    """

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

    def remove(self, group: Group) -> None:  # noqa: B027 - nothing to delete by default
        """Delete the (empty) groups; raise CgroupError if they stay."""

    def describe(self) -> str:
        """One line for the start-up log: the driver, where, which limits."""
        return self.name

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the driver's own resources (the server is stopping)."""
