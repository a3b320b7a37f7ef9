"""A task's combined output: an append-only file plus a wake-up for followers.

The output lives on disk, not in the server's memory, so a task that writes
gigabytes costs page cache, not RSS. One writer (the task's pump greenlet)
appends; any number of readers follow from their own offsets with ``pread``
on one shared descriptor, each waking on a gevent Event when caught up.

Also owns the output directory's layout: one ``<task id>.log`` per task,
created here (``create_log``, ``reopen_log``) and named in ``log_path`` only.
"""

import enum
import errno
import os
from typing import Iterator, Optional

import gevent
import gevent.event
import gevent.lock
import gevent.threadpool

from taskman.errors import ResourceExhausted, TaskmanError


class Stream(enum.IntEnum):
    """Which of a task's streams some output came from (the proto's OutputStream)."""

    COMBINED = 0  # stdout and stderr on one shared pipe: the task's exact order
    STDOUT = 1
    STDERR = 2


# Large reads keep the per-message overhead of a stream low (docs/design.md:
# about 60 us per message under gevent, so 64 KiB messages reach ~250 MB/s).
CHUNK_SIZE = 64 * 1024

# Where output is written to disk. Once the kernel throttles writers of dirty
# pages, a write blocks for tens to hundreds of ms: off the event loop it
# blocks only the task's pump (bench: GetTaskStatus p99 3.3 s -> 76 ms during
# a 10 GiB write). Not the hub's pool: gRPC polls its completion queue there.
_WRITERS = None


def _writers() -> gevent.threadpool.ThreadPool:
    global _WRITERS
    if _WRITERS is None:
        _WRITERS = gevent.threadpool.ThreadPool(4)
    return _WRITERS


class OutputLog:
    """The output file of one task.

    ``append`` and ``finish`` belong to the writer; ``follow`` and ``read``
    to readers. The log is *finished* once the writer has seen end of file:
    a follower then stops after reading everything.
    """

    def __init__(self, path: str, *, existing: bool = False, max_bytes: int = 0):
        self.path = path
        self.max_bytes = max_bytes  # 0: no cap
        self.write_error: Optional[str] = None
        self.dropped = 0  # bytes not kept (cap reached or write failure)
        self.capped = False
        self._changed = gevent.event.Event()
        self._readers = 0
        self._fd = -1
        self._writing = None  # the write in the pool, if any
        # Two pumps (stdout, stderr) may append at once: one write at a time.
        self._appending = gevent.lock.Semaphore()
        if existing:
            self.size = os.stat(path).st_size
            self.finished = True
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND
                               | os.O_CLOEXEC, 0o600)
            self.size = 0
            self.finished = False

    # -- the writer's side

    def append(self, data: bytes, stream: Stream = Stream.COMBINED) -> None:
        """Append to the file and wake every follower; never raises on disk errors.

        A full or failing disk must not stop the task or corrupt its status,
        so the bytes are dropped and counted and the error is remembered.
        Past ``max_bytes`` the rest is dropped after one marker line, so a
        reader sees where output was cut.
        """
        if not data or self.finished:
            return
        with self._appending:
            self._append(data, stream)

    def _append(self, data: bytes, stream: Stream) -> None:
        if self.finished:
            return
        if self.max_bytes and self.size + len(data) > self.max_bytes - len(self._marker()):
            if self.capped:
                self.dropped += len(data)
                return
            room = max(self.max_bytes - len(self._marker()) - self.size, 0)
            self.dropped += len(data) - room
            data = data[:room] + self._marker()
            self.capped = True
        view = memoryview(data)
        try:
            while view:
                self._writing = _writers().spawn(os.write, self._fd, view)
                written = self._writing.get()
                self.size += written
                view = view[written:]
        except OSError as error:
            self.dropped += len(view)
            if self.write_error is None:
                self.write_error = f"output not saved: {os.strerror(error.errno)}"
        self._wake()

    def _marker(self) -> bytes:
        return b"\n[taskman: output cap of %d bytes reached; the rest is dropped]\n" % self.max_bytes

    @property
    def note(self) -> str:
        """Why output was dropped, for the task's status; "" if nothing was."""
        if self.write_error:
            return self.write_error
        if self.capped:
            return f"output over the {self.max_bytes}-byte cap dropped"
        return ""

    def finish(self) -> None:
        """Mark the end of output; followers drain what is left and stop."""
        if self.finished:
            return
        self.finished = True
        self._wake()
        self._release_fd_if_idle()

    def remove(self) -> None:
        """Delete the file (the task record is being forgotten)."""
        self.finish()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _wake(self) -> None:
        # Swap in a fresh Event before setting the old one: every follower
        # waiting on the old one wakes, and a follower that looks at ``size``
        # after this point waits on the new one, so no wake-up is ever lost.
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    # -- the readers' side

    @property
    def in_use(self) -> bool:
        """True while some follower or reader is reading the log."""
        return self._readers > 0

    def read(self, offset: int, size: int = CHUNK_SIZE) -> bytes:
        """Return up to ``size`` bytes from ``offset`` (b"" past the end)."""
        self._acquire()
        try:
            return os.pread(self._fd, min(size, max(self.size - offset, 0)), offset)
        finally:
            self._release()

    def follow(self, offset: int = 0, cancelled: Optional[gevent.event.Event] = None,
               chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the output from ``offset`` on, waiting for more until finished.

        Stops when the log is finished and fully read, or as soon as
        ``cancelled`` is set (the client went away), so no greenlet is left
        waiting for output nobody will read.
        """
        self._acquire()
        try:
            while True:
                changed = self._changed
                if offset < self.size:
                    data = os.pread(self._fd, min(chunk_size, self.size - offset), offset)
                    if not data:  # truncated under us: nothing more to give
                        return
                    offset += len(data)
                    yield data
                    continue
                if self.finished or (cancelled is not None and cancelled.is_set()):
                    return
                if cancelled is None:
                    changed.wait()
                else:
                    gevent.wait([changed, cancelled], count=1)
        finally:
            self._release()

    def _acquire(self) -> None:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                raise TaskmanError(f"output unavailable: {os.strerror(error.errno)}") from None
        self._readers += 1

    def _release(self) -> None:
        self._readers -= 1
        self._release_fd_if_idle()

    def _release_fd_if_idle(self) -> None:
        # A finished log with no reader holds no descriptor, so thousands of
        # ended tasks cost no file descriptors.
        if self.finished and self._readers == 0 and self._fd >= 0:
            if self._writing is not None:
                # A pump killed mid-write leaves its write running in the
                # pool: never close (and let the kernel reuse) its descriptor.
                self._writing.wait()
            os.close(self._fd)
            self._fd = -1


def log_path(directory: str, task_id: str) -> str:
    """Where the output of task ``task_id`` is kept in ``directory``."""
    return os.path.join(directory, task_id + ".log")


def create_log(directory: str, task_id: str, max_bytes: int = 0) -> OutputLog:
    """Create the output log of a new task (the file must not exist yet).

    Raises ResourceExhausted when the disk or quota is full, TaskmanError
    for any other failure to create the file.
    """
    try:
        return OutputLog(log_path(directory, task_id), max_bytes=max_bytes)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted("no space left for task output on the server") from None
        raise TaskmanError(f"cannot create the task's output file: "
                           f"{os.strerror(error.errno)}") from None


def reopen_log(directory: str, task_id: str) -> OutputLog:
    """The finished output log of a task from an earlier life of the server.

    A file that went missing is created empty, so the task's record stays
    readable (with no output) rather than failing every stream of it.
    """
    path = log_path(directory, task_id)
    if not os.path.exists(path):
        open(path, "ab").close()
    return OutputLog(path, existing=True)


def ensure_directory(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check it is writable."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise TaskmanError(f"{path}: {os.strerror(errno.EACCES)}")
    return path
