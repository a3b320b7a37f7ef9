"""The server process's own dealings with the host: the OS seam outside spawning.

What the manager asks of the kernel that is not a task's spawn, signal or
reap (those are ``taskman.process``): adopting orphaned descendants, the
home directory a task is given, and telling whether a pid left by an earlier
life of the server is still one of its tasks, and killing it if so.
"""

import ctypes
import os
import pwd
import signal

_PR_SET_CHILD_SUBREAPER = 36


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


def is_process_of(pid: int, task_id: str) -> bool:
    """True if ``pid`` runs now and carries the task's id in its environment.

    The id (TASKMAN_TASK_ID, set at spawn) tells a task's process apart from
    an unrelated one that reused its pid after a crash of the server.
    """
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return b"TASKMAN_TASK_ID=" + task_id.encode() in environ.read().split(b"\0")
    except OSError:
        return False


def kill_process_group(pid: int) -> None:
    """SIGKILL the process group that ``pid`` leads, and ``pid`` itself.

    A task's main process leads its own group (it is spawned with setsid).
    Errors are ignored: a process already gone is what is wanted.
    """
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
