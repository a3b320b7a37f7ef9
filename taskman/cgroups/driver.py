"""What the manager sees of cgroups: the ``Driver`` interface, the ``Group``
it hands back for each task, and the ``Limits`` every task gets.

Drivers implement it per kind of host (v2.py, hybrid.py, none.py);
selection.py picks one.
"""

import abc
import dataclasses
import signal
from typing import TYPE_CHECKING, Optional, Tuple

from taskman.errors import InvalidArgument

if TYPE_CHECKING:  # slices.py imports Limits from here
    from taskman.cgroups.slices import Owner


@dataclasses.dataclass(frozen=True)
class Limits:
    """What each task may use. Defaults are the RFD's, plus a pids cap.

    A value of 0 means "no limit" for that resource. ``io_devices`` empty
    means the disks backing the host (see ``select_driver``). Checked when
    made (``validate``), so a Limits that exists is one the kernel takes.
    """

    cpu_quota_us: int = 200_000  # per period: 20% of one CPU
    cpu_period_us: int = 1_000_000
    memory_max: int = 512 * 1024 * 1024
    io_read_bps: int = 268_435_456  # 256 MiB/s
    io_write_bps: int = 268_435_456
    io_devices: Tuple[str, ...] = ()  # "MAJ:MIN"; empty: the devices backing the host
    pids_max: int = 1024

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgument for a value the kernel would refuse for every
        task, naming the option (``--cpu-period-us``...) and what it accepts.

        The kernel's rules for CFS bandwidth (v1 and v2 alike): a period of
        1000-1000000 us, a quota of at least 1000 us. Limits it refuses only
        on some hosts (a pids.max above the host's pid_max, say) surface as a
        CgroupError when a group is made.
        """
        for name in _AMOUNTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(f"{_option(name)} must be an integer, not {value!r}")
        if not _PERIOD_MIN <= self.cpu_period_us <= _PERIOD_MAX:
            raise InvalidArgument(f"{_option('cpu_period_us')} must be {_PERIOD_MIN} to "
                                  f"{_PERIOD_MAX} (microseconds), not {self.cpu_period_us}")
        if self.cpu_quota_us and self.cpu_quota_us < _QUOTA_MIN:
            raise InvalidArgument(f"{_option('cpu_quota_us')} must be 0 (no limit) or at least "
                                  f"{_QUOTA_MIN} (microseconds), not {self.cpu_quota_us}")
        for name in ("memory_max", "io_read_bps", "io_write_bps", "pids_max"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{_option(name)} must be 0 (no limit) or more, "
                                      f"not {getattr(self, name)}")


_AMOUNTS = ("cpu_quota_us", "cpu_period_us", "memory_max", "io_read_bps", "io_write_bps",
            "pids_max")
_PERIOD_MIN, _PERIOD_MAX, _QUOTA_MIN = 1_000, 1_000_000, 1_000


def _option(field: str) -> str:
    """The server option that sets ``field``: messages reach the operator who typed it."""
    return "--" + field.replace("_", "-")


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
    # True where making and removing groups is kernel work worth doing off
    # the event loop and ahead of demand (taskman.task_groups).
    costly = False

    def setup(self, spare: frozenset = frozenset()) -> int:
        """Prepare the driver's root; remove groups left by an earlier run of
        this server (killing their processes), except those of the tasks in
        ``spare`` (a reload adopted them). Return how many were removed."""
        return 0

    @abc.abstractmethod
    def create(self, task_id: str, owner: Optional["Owner"] = None) -> Group:
        """Make the task's groups with the limits applied, inside the
        owner's slice (made on first use) if the driver has slices; raise
        CgroupError."""

    @abc.abstractmethod
    def place(self, group: Group, pid: int) -> None:
        """Move ``pid`` (not yet running the command) into ``group``; raise CgroupError."""

    def procs_files(self, group: Group) -> Tuple[str, ...]:
        """The files a task's first process writes itself into to join
        ``group`` (the gate does, before the command runs; see
        taskman.sandbox); empty where ``place`` must put it there instead."""
        return ()

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
        """Delete the (empty) groups, and the owner's slice once no task is
        left in it; raise CgroupError if the task's groups stay."""

    def remove_groups(self, group: Group) -> None:
        """``remove`` without the slice: the task's groups only (its owner's
        slice is ``remove_slice``'s, which a caller may run later); raise
        CgroupError if they stay."""
        self.remove(group)

    def remove_slice(self, group: Group) -> None:  # noqa: B027 - no slices by default
        """Delete the slice that held ``group`` if no task is in it any more."""

    def describe(self) -> str:
        """One line for the start-up log: the driver, where, which limits."""
        return self.name

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the driver's own resources (the server is stopping)."""
