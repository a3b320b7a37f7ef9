"""The cgroup drivers' OS seam: every cgroup file read and write, mkdir,
rmdir, and the signals sent to the processes a group lists.

Why one place: each failure becomes a ``CgroupError`` that names the file and
the kernel's reason, so an operator can tell "no such device" from
"permission denied" without a traceback, and tests can see every write.

Files are opened without ``O_CREAT`` (a missing interface file means a missing
controller, which must be an error, not a new regular file) and with
``O_APPEND`` (the kernel ignores the offset; a fake tree in the tests then
keeps every value written, in order). Each value is one ``write(2)``: the
kernel parses one value per write.
"""

import errno
import fcntl
import os
import signal as signals
import stat
import sys
import threading
import time
from typing import Iterable, Iterator, List, Optional, Set

from taskman.errors import CgroupError

# rmdir of a group races with the exit of its last processes by a few
# milliseconds at most; after this it is a real failure.
REMOVE_RETRY_SECONDS = 0.2


def read(path: str) -> str:
    """Return the file's text; CgroupError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise _error("read", path, error) from None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):  # cgroup.procs of a big task spans several reads
            chunks.append(chunk)
    except OSError as error:
        raise _error("read", path, error) from None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", errors="replace")


def write(path: str, value: str) -> None:
    """Write ``value`` to an existing cgroup file in one write(2); CgroupError on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except OSError as error:
        raise _error("open", path, error) from None
    try:
        os.write(fd, value.encode("ascii"))
    except OSError as error:
        raise _error(f"write {value.strip()!r} to", path, error) from None
    finally:
        os.close(fd)


def exists(path: str) -> bool:
    return os.path.exists(path)


def keyed(path: str) -> dict:
    """Parse a flat keyed file ("key value" lines: cgroup.events, memory.events,
    memory.oom_control) into a dict of ints."""
    values = {}
    for line in read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def make_directory(path: str, parent_missing: bool = False) -> Optional[bool]:
    """Create a group; return False if it already existed.

    ``parent_missing``: return None if the parent does not exist (the
    caller makes it and tries again), where it is otherwise an error."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except FileNotFoundError as error:
        if parent_missing:
            return None
        raise _error("create", path, error) from None
    except OSError as error:
        raise _error("create", path, error) from None
    return True


def remove_directory(path: str) -> None:
    """Remove a group and the groups a task made beneath it, deepest first.

    A group that is already gone is fine. Raises CgroupError if it stays
    (still populated after REMOVE_RETRY_SECONDS, or permission).

    One rmdir first: a task group seldom has groups beneath it, and the
    kernel refuses (EBUSY) to remove one that has, so only then is the tree
    walked. Listing a group to look for them (a scandir of its few dozen
    interface files and an isdir) cost twice the rmdir itself.
    """
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError as error:
        if error.errno not in (errno.EBUSY, errno.ENOTEMPTY):  # groups beneath, or populated
            raise _error("remove", path, error) from None
    for directory in reversed(list(walk(path))):
        deadline = time.monotonic() + REMOVE_RETRY_SECONDS
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise _error("remove", directory, error) from None
                _pause(0.005)


def _pause(seconds: float) -> None:
    """Wait before retrying a busy rmdir: cooperatively on the main
    thread, plainly in a worker thread (removals run in the task groups'
    worker threads), where gevent's patched ``time.sleep`` would build the
    thread a hub of its own and keep its descriptors open for good."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or threading.get_native_id() == os.getpid():
        time.sleep(seconds)
    else:
        monkey.get_original("time", "sleep")(seconds)


def lock_directory(path: str) -> int:
    """Take an exclusive flock on the group ``path``; return the descriptor
    holding it (close it to release). CgroupError if another holder has it.

    Why: hierarchies such as v1 cpu or pids are often shared by every
    process on the host, so two servers (or a server and a test run) with
    the same root name would remove each other's task groups at start.
    """
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise _error("open", path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CgroupError(f"{path} is in use by another taskman server (or test run): "
                              f"give each server on a host its own cgroup root name") from None
        except OSError as error:
            os.close(fd)
            raise _error("lock", path, error) from None
        # The previous holder may have removed the directory between our
        # open and our lock: then we locked a dead inode; start over.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            make_directory(path)
        os.close(fd)
    raise CgroupError(f"cannot lock {path}: it keeps being removed and re-created")


def remove_if_unused(path: str) -> bool:
    """Remove the group ``path`` if it holds no process and no group; return
    whether it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def walk(path: str) -> Iterator[str]:
    """Yield ``path`` and every group beneath it, parents first; nothing if it is gone.

    A cgroup directory's link count is 2 plus its subdirectories (kernfs
    keeps it so): at 2 it is not listed. Listing one (a scandir of a few
    dozen interface files) cost ~20 us against ~2 us for the stat, on every
    emptiness check and signal of each of a task's groups. Elsewhere
    (a fake tree on a file system that does not count) it is always listed.
    """
    try:
        info = os.stat(path)
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode):
        return
    yield path
    if info.st_nlink == 2:
        return
    for name in subgroups(path):
        yield from walk(os.path.join(path, name))


def subgroups(path: str) -> List[str]:
    """Names of the groups directly beneath ``path``."""
    try:
        return sorted(entry.name for entry in os.scandir(path)
                      if entry.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise _error("list", path, error) from None


def pids(directories: Iterable[str]) -> Set[int]:
    """The processes listed in the ``cgroup.procs`` of the given groups."""
    found: Set[int] = set()
    for directory in directories:
        try:
            text = read(os.path.join(directory, "cgroup.procs"))
        except CgroupError:
            if os.path.isdir(directory):
                raise
            continue  # removed meanwhile: empty
        found.update(int(word) for word in text.split() if word.isdigit())
    return found


def signal_listed(directories: List[str], number: int, first: Optional[int] = None) -> int:
    """Send ``number`` to every process the groups list; return how many got it.

    ``first`` (the task's main process) is signalled before the others: a
    shell that sees its child die of the signal before it gets its own would
    exit with a status instead of dying of the signal the stop sent.

    pid_max is 32768 on common hosts, so a listed pid can exit and be reused
    by an unrelated process before kill(2). To never signal a stranger, each
    pid is pinned with a pidfd first, and signalled only if the groups still
    list it after pinning (a pidfd always names the process it was opened on).
    """
    pinned = {}
    try:
        for pid in sorted(pids(directories), key=lambda pid: pid != first):
            try:
                pinned[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # exited meanwhile
        still_listed = pids(directories) if pinned else set()
        sent = 0
        for pid, fd in pinned.items():
            if pid not in still_listed:
                continue
            try:
                signals.pidfd_send_signal(fd, number)
                sent += 1
            except ProcessLookupError:
                pass
            except OSError as error:
                raise _error(f"signal {number} pid {pid} of", directories[0], error) from None
        return sent
    finally:
        for fd in pinned.values():
            os.close(fd)


def _error(action: str, path: str, error: OSError) -> CgroupError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    return CgroupError(f"cannot {action} {path}: {reason}")
