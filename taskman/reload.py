"""Reloading the server in place: check the new image, hand over, exec, adopt.

A reload (SIGHUP) replaces the server's program without ending its tasks:
the process execs the installed ``taskman-server`` with its own command
line, keeps its pid, and so stays the parent of every task. These are the
pieces that do not depend on the manager (docs/design.md, "Reload"):

- the old image: ``installed_program``, ``check`` (the new image's
  ``--check`` with the same options: a failing one leaves the server as it
  was), ``Guard`` (one reload at a time), ``block_signal``, ``exec_image``;
- the new image: ``adopt_children`` (a child watcher for every adopted pid
  before any yield, then a non-blocking waitpid for those that exited
  during the exec), ``unblock_signal`` once its SIGHUP handler is in place;
- the last resort (``end_abandoned``): a new image that cannot start ends
  the tasks it was handed, so none outlives the server unsupervised.

The procedure that uses them is taskman.reloading. No grpc here.
"""

import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import gevent
import gevent.event
from gevent.hub import get_hub

from taskman import handover as handover_format
from taskman import host
from taskman.cgroups import cgroupfs
from taskman.errors import TaskmanError

log = logging.getLogger("taskman.reload")

SIGNAL = signal.SIGHUP
PROGRAM = "taskman-server"
CHECK_TIMEOUT = 60.0
# The last resort waits this long for a killed task to be reaped.
REAP_TIMEOUT = 10.0
# Nice values the check and the reload window run ahead of the tasks by:
# while the server is down every client is refused and every task's output
# waits in its pipe, so the new image's start-up should not queue behind
# the tasks for the CPU (docs/operations.md, "Upgrading").
PRIORITY_BOOST = 10
# With the kernel's autogroup scheduling (sched_autogroup_enabled) the CPU
# is shared between sessions first, and a nice value counts only among the
# threads of one session: every task is a session of its own (setsid), so
# the server's session is boosted as a whole too.
AUTOGROUP = "/proc/self/autogroup"

try:  # the real waitpid: gevent's patched one is cooperative only for pids it spawned
    from gevent.monkey import get_original

    _waitpid = get_original("os", "waitpid")
except ImportError:  # pragma: no cover - gevent always has it
    _waitpid = os.waitpid


class ReloadRefused(TaskmanError):
    """The reload did not happen and the server runs on as it was."""


def address(configured: str, adopted) -> str:
    """Where to listen: ``configured``, but the port the previous image had
    when it was 0 (a reload must come back where clients are)."""
    if adopted is None or not configured.endswith(":0"):
        return configured
    return f"{configured[:-2]}:{adopted[0].port}"


def _started_in() -> str:
    try:
        return os.getcwd()
    except OSError:  # started in a directory since removed
        return ""


# Where the server started: a relative ``sys.argv[0]`` (a server started as
# ``.venv/bin/taskman-server``) is relative to it.
STARTED_IN = _started_in()


def installed_program(argv0: Optional[str] = None) -> str:
    """The program to check and exec: the one this server was started as
    (``sys.argv[0]``, which ``pip install -U`` replaces in place), else
    ``taskman-server`` on PATH. ReloadRefused if there is none."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if argv0 and os.sep in argv0 and not os.path.isabs(argv0) and STARTED_IN:
        argv0 = os.path.normpath(os.path.join(STARTED_IN, argv0))
    if argv0 and os.path.isabs(argv0) and os.access(argv0, os.X_OK) \
            and os.path.basename(argv0) == PROGRAM:
        return argv0
    found = shutil.which(PROGRAM)
    if found is None:
        raise ReloadRefused(f"no {PROGRAM} to reload into: not {argv0!r}, none on PATH")
    return os.path.abspath(found)


def check(program: str, options: List[str], timeout: float = CHECK_TIMEOUT) -> Tuple[bool, str]:
    """Run ``program --check options...``; return (passed, what it printed).

    Spawned with posix_spawn (no fork with gRPC loaded, docs/design.md) and
    waited for through a libev child watcher, so the server goes on serving
    meanwhile. The check gets every signal at its default and none blocked,
    and is told it checks for a reload (taskman.cli.check).
    """
    argv = [program, "--check", *[option for option in options if option != "--check"]]
    with tempfile.TemporaryFile() as output:
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, output.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, output.fileno(), 2)]
        try:
            environment = dict(os.environ, **{handover_format.CHECK_VARIABLE: "1"})
            pid = os.posix_spawn(program, argv, environment, file_actions=actions,
                                 setsigmask=(), setsigdef=_default_signals())
        except OSError as error:
            return False, f"cannot run {program}: {error.strerror}"
        boost_priority(pid)
        status = _wait_child(pid, timeout)
        output.seek(0)
        text = output.read().decode(errors="replace").strip()
    if status is None:
        return False, f"{program} --check did not finish in {timeout:g}s"
    return os.waitstatus_to_exitcode(status) == 0, text


def _default_signals():
    return sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, 32, 33})


def _wait_child(pid: int, timeout: float) -> Optional[int]:
    """The wait status of child ``pid``, cooperatively; None (after killing
    and reaping it) if it outlived ``timeout``."""
    watcher = get_hub().loop.child(pid, False)
    done = gevent.event.Event()
    watcher.start(done.set)
    try:
        # gevent installs its SIGCHLD handler with the first child watcher:
        # a child that exited before then sent its SIGCHLD to nobody.
        reaped, status = _waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return status
        if done.wait(timeout):
            return watcher.rstatus
        os.kill(pid, signal.SIGKILL)
        done.wait(REAP_TIMEOUT)
        return None
    finally:
        watcher.stop()


def boost_priority(pid: int = 0) -> Optional[int]:
    """Lower the nice value of ``pid`` (0: the calling thread, which an exec
    keeps) by PRIORITY_BOOST; return the value before, or None if this
    process may not (not root)."""
    try:
        before = os.getpriority(os.PRIO_PROCESS, pid)
        os.setpriority(os.PRIO_PROCESS, pid, max(before - PRIORITY_BOOST, -20))
    except OSError:
        return None
    return before


def boost_autogroup() -> Optional[int]:
    """Lower the nice value of this process's autogroup (its session: the
    server and its ``--check``, never a task) by PRIORITY_BOOST; return the
    value before, or None without autogroups or the right to (not root).

    Only when the server leads its session (systemd's services do; so does
    ``setsid taskman-server``): a server started from a shell shares the
    shell's session, whose other processes are not taskman's to boost."""
    if os.getsid(0) != os.getpid():
        return None
    try:
        with open(AUTOGROUP) as file:
            before = int(file.read().split()[-1])  # "/autogroup-123 nice 0"
        with open(AUTOGROUP, "w") as file:
            file.write(str(max(before - PRIORITY_BOOST, -20)))
    except (OSError, ValueError, IndexError):
        return None
    return before


def restore_autogroup(nice: Optional[int]) -> None:
    """This process's autogroup back at nice value ``nice``; nothing for None."""
    if nice is None:
        return
    try:
        with open(AUTOGROUP, "w") as file:
            file.write(str(nice))
    except OSError:
        pass  # the boost then lasts as long as this session


def take_autogroup_nice() -> Optional[int]:
    """As ``take_nice``, for the autogroup's value (``boost_autogroup``)."""
    try:
        return int(os.environ.pop(handover_format.AUTOGROUP_NICE_VARIABLE, ""))
    except ValueError:
        return None


def take_nice() -> Optional[int]:
    """The nice value a reload's ``exec_image`` asked this image to go back
    to, if any; removed from the environment so no task sees it."""
    try:
        return int(os.environ.pop(handover_format.NICE_VARIABLE, ""))
    except ValueError:
        return None


def restore_priority(nice: Optional[int]) -> None:
    """Every thread of this process back at nice value ``nice`` (threads made
    since the boost inherited it). Before any task is spawned: tasks would
    inherit it too. Nothing for None."""
    if nice is None:
        return
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        threads = ["0"]
    for thread in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, int(thread), nice)
        except OSError:
            pass  # exited meanwhile


class Guard:
    """One reload at a time: gevent runs a greenlet per signal, and a second
    SIGHUP during the first reload must not start another."""

    def __init__(self):
        self.running = False

    def __enter__(self) -> bool:
        """True if this caller may reload; False while another reload runs."""
        if self.running:
            return False
        self.running = True
        return True

    def __exit__(self, *exc_info) -> None:
        self.running = False


# Blocked from just before the exec until the new image has its handlers.
_HELD = {SIGNAL, signal.SIGTERM, signal.SIGINT}


def block_signal() -> None:
    """Block SIGHUP (and SIGTERM, SIGINT) until the new image has its
    handlers: a SIGHUP between here and then would kill the server (its
    default action) and orphan every task; a SIGTERM would be lost, or kill
    the new image before it could stop the tasks. The mask survives exec;
    spawned tasks get an empty one."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)


def unblock_signal() -> None:
    """After the handlers are in: a signal that came meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def exec_image(program: str, options: List[str], handover_path: str,
               fds: Iterable[int], nice: Optional[int] = None,
               autogroup_nice: Optional[int] = None) -> None:
    """Exec ``program options...`` with the hand-over named in the environment
    (and ``nice``, the value to go back to after a ``boost_priority``;
    ``autogroup_nice``, after a ``boost_autogroup``).

    ``fds`` (the tasks' output pipes) are made inheritable only now: left
    so earlier, every task spawned meanwhile would inherit them. Returns
    only if the exec failed, having made them close-on-exec again; raises
    ReloadRefused then.
    """
    fds = list(fds)
    for fd in fds:
        os.set_inheritable(fd, True)
    os.environ[handover_format.VARIABLE] = handover_path
    if nice is not None:
        os.environ[handover_format.NICE_VARIABLE] = str(nice)
    if autogroup_nice is not None:
        os.environ[handover_format.AUTOGROUP_NICE_VARIABLE] = str(autogroup_nice)
    try:
        os.execv(program, [program, *options])
    except OSError as error:
        os.environ.pop(handover_format.VARIABLE, None)
        os.environ.pop(handover_format.NICE_VARIABLE, None)
        os.environ.pop(handover_format.AUTOGROUP_NICE_VARIABLE, None)
        for fd in fds:
            os.set_inheritable(fd, False)
        raise ReloadRefused(f"cannot exec {program}: {error.strerror}") from None


def take_handover_path() -> Optional[str]:
    """The hand-over this image was started with, if any; removed from the
    environment so no later exec or spawn sees it."""
    return os.environ.pop(handover_format.VARIABLE, None) or None


def adopt_children(pids: Iterable[int], adopt: Callable[[int], object]) -> Dict[int, Optional[int]]:
    """Adopt every pid, then return those that exited during the exec.

    ``adopt(pid)`` must start a libev child watcher for ``pid`` and must not
    yield. libev reaps with waitpid(-1) and drops the status of a pid nobody
    watches; and a child that exited during the exec spent its SIGCHLD, so
    its watcher would never fire. Hence every watcher first, with no yield
    in between, then a non-blocking waitpid of each. Returns pid -> wait
    status for the exited ones; None for a pid that is not (or no longer)
    our child, whose status is lost.
    """
    pids = list(pids)
    for pid in pids:
        adopt(pid)
    exited: Dict[int, Optional[int]] = {}
    for pid in pids:
        try:
            reaped, status = _waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            exited[pid] = None
            continue
        if reaped == pid:
            exited[pid] = status
    return exited


def close_inherited(fds: Iterable[int]) -> None:
    """Make the adopted descriptors close-on-exec again, before any spawn."""
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass


def end_abandoned(state: handover_format.Handover, record: Callable[[str, int], None]) -> int:
    """The last resort of a new image that cannot serve: SIGKILL each
    handed-over task (its cgroups and its main process, which is still this
    process's child), reap it, and ``record(task_id, wait_status)``.

    Returns how many tasks were ended. Never raises for a task already gone.
    """
    ended = 0
    for task in state.tasks:
        directories = list(task.group_directories.values())
        try:
            if directories:
                cgroupfs.signal_listed(directories, signal.SIGKILL)
        except TaskmanError as error:
            log.error("task %s: cannot kill its cgroups: %s", task.id, error)
        pidfd = host.find_leftover(task.pid, task.start_identity)
        if pidfd is not None:
            host.kill_leftover(task.pid, pidfd)
        status = task.wait_status if task.wait_status is not None else _reap(task.pid)
        for directory in directories:
            try:
                cgroupfs.remove_directory(directory)
                if task.slice_name:  # the user's slice, once no task is left in it
                    cgroupfs.remove_if_unused(os.path.dirname(directory))
            except TaskmanError:
                pass  # the next start's clean-up removes it
        record(task.id, status if status is not None else _KILLED)
        ended += 1
    for fd in state.fds:
        try:
            os.close(fd)
        except OSError:
            pass
    return ended


_KILLED = signal.SIGKILL  # a wait status: killed by SIGKILL


def _reap(pid: int) -> Optional[int]:
    """The wait status of our child ``pid`` (killed), or None if lost or late.

    A watcher first, then a non-blocking waitpid, as in adopt_children: the
    loop may reap a child nobody watches and drop its status."""
    watcher = get_hub().loop.child(pid, False)
    done = gevent.event.Event()
    watcher.start(done.set)
    try:
        try:
            reaped, status = _waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if reaped == pid:
            return status
        return watcher.rstatus if done.wait(REAP_TIMEOUT) else None
    finally:
        watcher.stop()
