"""The server process's own dealings with the host: the OS seam outside spawning.

What the manager asks of the kernel that is not a task's spawn or reap (those
are ``taskman.process``): adopting orphaned descendants, pidfds, and telling
whether a pid left by an earlier life of the server is still one of its tasks
(by its start time and its cgroups, never by its environment, which the task
controls), and killing it if so.
"""

import ctypes
import errno
import functools
import os
import pwd
import signal
import time
from typing import List, Optional

_PR_SET_CHILD_SUBREAPER = 36
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# /proc/<pid>/stat's start time: the boot clock at the fork, in clock ticks
# (the kernel's nsec_to_clock_t, a floor division where a second holds whole ticks).
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_TICK_NS = 10 ** 9 // _TICKS_PER_SECOND if 10 ** 9 % _TICKS_PER_SECOND == 0 else 0
_CLOCK_SLACK_NS = 50_000  # a margin for any disagreement between our clock read and the kernel's


def become_subreaper() -> None:
    """Adopt orphaned descendants of tasks, so they are reaped here (libev's
    SIGCHLD handler reaps every child) instead of escaping to init.

    Best effort: without prctl the server still works, orphans go to init.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def home_directory() -> str:
    """The home directory of the user the server runs as; "/" if it has none."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return "/"


def open_pidfd(pid: int) -> int:
    """A pidfd for ``pid`` (close-on-exec), or -1 where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def pidfd_send(pidfd: int, number: int) -> bool:
    """pidfd_send_signal; False if the process has exited (ESRCH)."""
    try:
        signal.pidfd_send_signal(pidfd, number)
    except ProcessLookupError:
        return False
    return True


def start_identity(pid: int) -> str:
    """``<boot id>/<start time in clock ticks>`` of ``pid``; "" if unreadable.

    A pid is reused, but not with the same start time within one boot: this
    names one process for good (crash recovery compares it after a restart).
    Read at every start: one open and read of /proc/<pid>/stat (~35 us
    here, where a buffered open() of it and of the boot id took ~120 us).
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 4096)
        finally:
            os.close(fd)
        # The command name (field 2) may hold spaces and parentheses:
        # count fields after its closing parenthesis; starttime is field 22.
        return f"{boot_id()}/{int(text.rsplit(b')', 1)[1].split()[19])}"
    except (OSError, IndexError, ValueError):
        return ""


def boot_clock() -> int:
    """CLOCK_BOOTTIME in ns, the clock a process's start time is taken on."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def spawned_identity(before: int, after: int) -> str:
    """start_identity of a child forked between two boot_clock() reads, known
    without reading /proc when both fall in one clock tick (a spawn takes
    ~0.25 ms, a tick 10 ms); "" otherwise: call start_identity.

    Why: reading /proc/<pid>/stat takes the process's exec_update_lock
    (Linux 6.18 here), which a just-spawned gate holds until its exec is done
    (posix_spawn returns before that): on 2 busy CPUs, a fifth to a third of
    the starts waited ~0.7 ms there, on the event loop, for the gate's exec.
    """
    if not _TICK_NS:
        return ""
    tick = (before - _CLOCK_SLACK_NS) // _TICK_NS
    if tick != (after + _CLOCK_SLACK_NS) // _TICK_NS:
        return ""
    try:
        return f"{boot_id()}/{tick}"
    except OSError:
        return ""


@functools.cache
def boot_id() -> str:
    """This boot's id, read once: it cannot change while this process lives
    (reading /proc/sys costs ~50 us, a third of a start's identity)."""
    with open(BOOT_ID) as boot:
        return boot.read().strip()


def is_running(pid: int, identity: str) -> bool:
    """True if the process ``identity`` named is alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z" and start_identity(pid) == identity


def cgroup_paths(pid: int) -> List[str]:
    """The cgroup path of ``pid`` in each hierarchy (/proc/<pid>/cgroup); [] if gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as lines:
            return [line.rstrip("\n").split(":", 2)[2] for line in lines if line.count(":") >= 2]
    except OSError:
        return []


def in_task_group(pid: int, task_id: str) -> bool:
    """True if ``pid`` is in a group of the task in some hierarchy (task
    groups are named after the task id, at any depth under taskman's root)."""
    return any(task_id in path.split("/") for path in cgroup_paths(pid))


def find_leftover(pid: int, identity: str) -> Optional[int]:
    """A pidfd for ``pid`` if it is still the process ``identity`` named
    (see start_identity); None if it is gone or the pid was reused."""
    if not pid or not identity:
        return None
    pidfd = open_pidfd(pid)
    if pidfd < 0:
        return None
    # Checked after opening the pidfd: the pidfd then names what was checked.
    # A zombie is gone too: its status went to whoever reaps it.
    if not is_running(pid, identity):
        os.close(pidfd)
        return None
    return pidfd


def kill_leftover(pid: int, pidfd: int) -> None:
    """SIGKILL a leftover main process through its pidfd, and its process group.

    A task's main process leads its own group (it is spawned with setsid).
    Errors are ignored: a process already gone is what is wanted.
    """
    try:
        try:
            os.killpg(pid, signal.SIGKILL)  # first: the leader, alive, holds the pgid
        except OSError as error:
            if error.errno not in (errno.ESRCH, errno.EPERM):
                raise
        pidfd_send(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
