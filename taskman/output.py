"""A task's output: an append-only file plus a wake-up for followers.

The output lives on disk, not in the server's memory, so a task that writes
gigabytes costs page cache, not RSS. One writer (the task's pump) appends;
any number of readers follow from their own offsets with ``pread`` on one
shared descriptor, each waking on a gevent Event when caught up. Each
appended chunk also gets a record in the log's index (``output_index``): its
stream and read time, so a reader can select a stream, start at a time, or
tail by bytes or lines. Also owns the directory's layout: ``<task id>.log``
and its index (``output_index.index_path``), created here (``create_log``,
``reopen_log``) and named in ``log_path`` only.
"""

import datetime
import errno
import os
import time
from typing import Iterator, Optional

import gevent
import gevent.event
import gevent.lock
import gevent.threadpool

from taskman.errors import ResourceExhausted, TaskmanError
from taskman.output_index import (
    RECORD,
    IndexReader,
    Selector,
    Stream,
    index_directory,
    index_path,
    read_record,
    remove_files,
    write_chunk,
)
from taskman.output_reading import CHUNK_SIZE, Chunk, Held, Recent, await_more, chunk_size, count_reader, data_only

__all__ = ["Chunk", "OutputLog", "Selector", "Stream", "create_log", "data_only",
           "ensure_directory", "log_path", "reopen_log"]

# Non-matching records a follower skips before letting other greenlets run.
_SKIPS_PER_YIELD = 4096
# Records join a chunk (dated by its first) only within this, --timestamps' precision (docs/design.md).
_MERGE_NS = 10_000_000
_STREAMS = tuple(Stream)

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
    """The output file of one task and its index.

    ``append`` and ``finish`` belong to the writer; ``follow`` and ``read``
    to readers. The log is *finished* once the writer has seen end of file:
    a follower then stops after reading everything. In memory it keeps only
    counters: the size, the number of index records and the bytes they cover."""

    def __init__(self, path: str, *, existing: bool = False, max_bytes: int = 0,
                 index_path: Optional[str] = None):
        """``index_path``: where the log's index is (None: no index, all output is one COMBINED record)."""
        self.path = path
        self.index_path = index_path
        self.max_bytes = max_bytes  # 0: no cap
        self.write_error: Optional[str] = None
        self.dropped = 0  # bytes not kept (cap reached or write failure)
        self.capped = False
        self._changed = gevent.event.Event()
        self._readers = 0
        self._recent = Recent()  # the last append, while read
        self._fd = -1
        self.index_fd = -1
        self._writing = None  # the write in the pool, if any
        # Two pumps (stdout, stderr) may append at once: one write at a time.
        self._appending = gevent.lock.Semaphore()
        self._last_time_ns = 0
        if existing:
            self.size = os.stat(path).st_size
            self.finished = True
            self._load_index()
        else:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(path, flags | os.O_APPEND, 0o600)
            try:
                if index_path is not None:
                    self.index_fd = os.open(index_path, flags, 0o600)
            except BaseException:
                os.close(self._fd)
                os.unlink(path)
                raise
            self.size = 0
            self.finished = False
            self.index_records = 0  # records in the index file
            self.indexed_bytes = 0  # bytes of the log they describe: all of an indexed live log
            self.unindexed_time_ns = time.time_ns()

    def _load_index(self) -> None:
        """Count the records of a finished log's index (none if it has no index)."""
        self.index_records = self.indexed_bytes = 0
        self.unindexed_time_ns = int(os.stat(self.path).st_mtime * 1e9)
        if self.index_path is None:
            return
        try:
            fd = os.open(self.index_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # written before logs had an index
        try:
            count = os.fstat(fd).st_size // RECORD.size  # a torn last record is ignored
            while count:
                last = read_record(fd, count - 1)
                if last.end <= self.size:
                    self.indexed_bytes = last.end
                    self._last_time_ns = last.time_ns
                    break
                count -= 1  # describes bytes the log lost
            self.index_records = count
            self.unindexed_time_ns = max(self.unindexed_time_ns, self._last_time_ns)
        finally:
            os.close(fd)

    def date_unindexed(self, time: datetime.datetime) -> None:
        """Date the output of a log that has no index at all (e.g. the task's
        start time), instead of the file's modification time."""
        if self.index_records == 0 and time is not None:
            self.unindexed_time_ns = int(time.timestamp() * 1e9)

    # -- the writer's side

    def resume_writing(self, max_bytes: int = 0) -> None:
        """A reopened log live again, appending at its size (a reload handed its task over)."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        if self.index_path is not None:
            self.index_fd = os.open(self.index_path, os.O_RDWR | os.O_CLOEXEC)
        self.max_bytes, self.finished = max_bytes, False

    def append(self, data: bytes, stream: Stream = Stream.COMBINED) -> None:
        """Append to the file, index it and wake every follower; never raises on disk errors.

        A full or failing disk must not stop the task or corrupt its status,
        so the bytes are dropped and counted and the error is remembered.
        Past ``max_bytes`` the rest is dropped after one marker line, so a
        reader sees where output was cut."""
        if not data or self.finished:
            return
        with self._appending:
            self._append(data, stream)

    def _append(self, data: bytes, stream: Stream) -> None:
        if self.finished:
            return
        if self.capped:
            self.dropped += len(data)
            return
        if self.max_bytes and self.size + len(data) > self.max_bytes - len(self._marker()):
            room = max(self.max_bytes - len(self._marker()) - self.size, 0)
            self.dropped += len(data) - room
            data = data[:room] + self._marker()
            self.capped = True
        self._write(data, stream)

    def cap(self) -> None:
        """Keep no more of this log's output from now on (its owner's output
        quota is full): the cap's marker line goes at the end, as for
        ``max_bytes``, and what follows is dropped and counted."""
        if self.finished or self.capped:
            return
        with self._appending:
            if not (self.finished or self.capped):
                self.max_bytes, self.capped = self.size, True
                self._write(self._marker(), Stream.COMBINED)

    def _write(self, data: bytes, stream: Stream) -> None:
        # Never backwards, so readers can search the index by time.
        time_ns = self._last_time_ns = max(time.time_ns(), self._last_time_ns)
        self._writing = _writers().spawn(write_chunk, self._fd, data, self.index_fd,
                                         self.index_records, self.size, time_ns, stream)
        written, error = self._writing.get()
        if written == len(data) and self._readers and type(data) is bytes:
            self._recent.keep(self.size, data)
        if written:
            self.size += written
            if self.index_fd >= 0:
                self.indexed_bytes = self.size
                self.index_records += 1
        if error is not None:
            self.dropped += len(data) - written
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
        """Delete the log and its index (the task record is being forgotten)."""
        self.finish()
        remove_files(self.path, self.index_path)

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

    def follow(self, *args, **view) -> Iterator[bytes]:
        """``chunks`` (same arguments) without the labels: the output bytes alone."""
        return data_only(self.chunks(*args, **view))

    def chunks(self, offset: int = 0, selector: Selector = Selector.ALL, tail_bytes: int = 0,
               tail_lines: int = 0, since: Optional[datetime.datetime] = None,
               follow: bool = True, cancelled: Optional[gevent.event.Event] = None,
               chunk_size: int = 0) -> Iterator[Chunk]:
        """Yield the output from ``offset`` on as Chunks, waiting for more until finished.

        ``selector`` keeps only some streams (offsets still count all of
        them). ``tail_bytes``, ``tail_lines`` (of the selected streams) and
        ``since`` (output read at or after that time) start later, never
        before ``offset``. A chunk holds one stream's consecutive records,
        at most ``chunk_size`` bytes (0: output_reading.chunk_size()), dated by its first record.
        Stops when the log is finished and fully read, at the output present
        at the call if not ``follow``, or as soon as ``cancelled`` is set
        (the client went away), so no greenlet is left waiting for output
        nobody will read. The log is held (retention leaves it alone) from
        this call, not from the first iteration, until the iterator is
        exhausted or closed."""
        self._acquire()
        return Held(self._chunks(offset, Selector(selector), tail_bytes, tail_lines, since,
                                 follow, cancelled, chunk_size), self._release)

    def _chunks(self, offset, selector, tail_bytes, tail_lines, since, follow, cancelled,
                size) -> Iterator[Chunk]:
        index = IndexReader(self)
        end = None if follow else self.size
        if tail_bytes or tail_lines or since is not None:
            since_ns = int(since.timestamp() * 1e9) if since is not None else None
            read = lambda start, size: os.pread(self._fd, size, start)  # noqa: E731
            offset = max(offset, index.view_start(selector, tail_bytes, tail_lines,
                                                  since_ns, read, size or CHUNK_SIZE))
        number, skipped, sent_at = index.locate(offset), 0, 0.0
        while True:
            changed = self._changed
            limit = self.size if end is None else end
            if offset < limit:
                record = index.record(number)
                if not selector.wants(record.stream):
                    offset, number = record.end, number + 1
                    skipped += 1
                    if skipped % _SKIPS_PER_YIELD == 0:
                        gevent.sleep(0)  # a long run of the other stream
                    continue
                most = size or chunk_size()
                stop = min(record.end, offset + most, limit)
                last = record  # merge the same stream's next records into the chunk
                while (stop == last.end and stop - offset < most
                       and number + 1 < index.count()):
                    after = index.record(number + 1)
                    if after.stream != record.stream or after.time_ns - record.time_ns >= _MERGE_NS:
                        break
                    number, last = number + 1, after
                    stop = min(after.end, offset + most, limit)
                data = self._recent.read(self._fd, offset, stop)
                if not data:  # truncated under us: nothing more to give
                    return
                chunk = Chunk(offset, _STREAMS[record.stream], record.time_ns, data)
                offset += len(data)
                if offset >= last.end:
                    number += 1
                yield chunk
                sent_at = time.monotonic()  # the consumer asks for more once it has sent it
                continue
            if (self.finished or end is not None
                    or (cancelled is not None and cancelled.is_set())):
                return
            await_more(self, offset, changed, cancelled, sent_at, size)

    def _acquire(self) -> None:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                if self.index_records:
                    self.index_fd = os.open(self.index_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                raise TaskmanError(f"output unavailable: {os.strerror(error.errno)}") from None
        self._readers += 1
        count_reader(1)

    def _release(self) -> None:
        self._readers -= 1
        count_reader(-1)
        if not self._readers:
            self._recent.forget()
        self._release_fd_if_idle()

    def _release_fd_if_idle(self) -> None:
        # A finished log with no reader holds no descriptor, so thousands of ended tasks cost no file descriptors.
        if self.finished and self._readers == 0 and self._fd >= 0:
            if self._writing is not None:
                # A pump killed mid-write leaves its write running in the
                # pool: never close (and let the kernel reuse) its descriptors.
                self._writing.wait()
            os.close(self._fd)
            self._fd = -1
            if self.index_fd >= 0:
                os.close(self.index_fd)
                self.index_fd = -1


def log_path(directory: str, task_id: str) -> str:
    """Where the output of task ``task_id`` is kept in ``directory``."""
    return os.path.join(directory, task_id + ".log")


def create_log(directory: str, task_id: str, max_bytes: int = 0) -> OutputLog:
    """Create the output log of a new task and its index (neither may exist yet).

    Raises ResourceExhausted when the disk or quota is full, TaskmanError
    for any other failure to create the files."""
    path, index = log_path(directory, task_id), index_path(directory, task_id)
    try:
        try:
            return OutputLog(path, max_bytes=max_bytes, index_path=index)
        except FileNotFoundError:  # the indexes' directory, made here when missing, not tried at each start
            os.makedirs(index_directory(directory), mode=0o700, exist_ok=True)
            return OutputLog(path, max_bytes=max_bytes, index_path=index)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted("no space left for task output on the server") from None
        raise TaskmanError(f"cannot create the task's output file: "
                           f"{os.strerror(error.errno)}") from None


def reopen_log(directory: str, task_id: str) -> OutputLog:
    """The finished output log of a task from an earlier life of the server.

    A file that went missing is created empty, so the task's record stays
    readable (with no output) rather than failing every stream of it. A log
    with no index (written before indexes existed) reads as one COMBINED
    record."""
    path = log_path(directory, task_id)
    if not os.path.exists(path):
        open(path, "ab").close()
    return OutputLog(path, existing=True, index_path=index_path(directory, task_id))


def ensure_directory(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check it is writable."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise TaskmanError(f"{path}: {os.strerror(errno.EACCES)}")
    return path
