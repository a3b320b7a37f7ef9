"""The index of a task's output log: which stream each byte came from, and when.

For ``output/<id>.log``, ``output-index/<id>.idx`` holds one fixed-size
record per appended chunk (its offset in the log, the time it was read in ns
since the epoch, its length, its stream). Records are contiguous and their times never go
backwards, so an offset or a time is found by binary search over a few
records read from disk: the server keeps no per-chunk state in memory, even
for a task that writes gigabytes.

``write_chunk`` writes a chunk and its record together (in the writers'
pool), so every kept byte has a record.

A log written before the index existed, or the end of one a crash cut
before its record was written, has no record: ``IndexReader`` shows those
bytes as one COMBINED record (see ``OutputLog.unindexed_time_ns``).
"""

import enum
import errno
import os
import struct
from typing import Callable, Iterable, NamedTuple, Optional, Tuple

# offset u64, time ns i64, length u32, stream u8, padding to 24 bytes
RECORD = struct.Struct("<QqIB3x")

# Records read at once when walking the index.
BATCH = 2048


class Stream(enum.IntEnum):
    """Which of a task's streams some output came from (the proto's OutputStream)."""

    COMBINED = 0  # stdout and stderr on one shared pipe: the task's exact order
    STDOUT = 1
    STDERR = 2


class Selector(enum.IntEnum):
    """Which streams a reader wants (the proto's OutputSelector).

    STDOUT and STDERR select only output tagged so: a task started with one
    shared pipe has neither (its output is COMBINED), only ALL shows it.
    """

    ALL = 0
    STDOUT = 1
    STDERR = 2

    def wants(self, stream: int) -> bool:
        return self is Selector.ALL or stream == self


class Record(NamedTuple):
    offset: int
    time_ns: int
    length: int
    stream: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def index_directory(output_directory: str) -> str:
    """Where the indexes of the logs in ``output_directory`` are kept: a
    sibling directory, so the output directory holds only the logs."""
    return os.path.join(os.path.dirname(os.path.normpath(output_directory)), "output-index")


def index_path(output_directory: str, task_id: str) -> str:
    """Where the index of task ``task_id``'s log in ``output_directory`` is kept."""
    return os.path.join(index_directory(output_directory), task_id + ".idx")


def remove_files(*paths: Optional[str]) -> None:
    """Unlink a task's log and its index; one already gone (or None) is no error."""
    for path in paths:
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def read_record(fd: int, number: int) -> Record:
    return Record._make(RECORD.unpack(os.pread(fd, RECORD.size, number * RECORD.size)))


class IndexReader:
    """The records of one log as a reader sees them, read from disk in batches.

    ``log`` is the OutputLog: its ``index_fd``, ``index_records``,
    ``indexed_bytes``, ``size`` and ``unindexed_time_ns`` say what exists now.
    """

    def __init__(self, log):
        self.log = log
        self._first = 0  # number of the first cached record
        self._cached: list = []

    def count(self) -> int:
        """Records there are now, counting the unindexed end as one."""
        log = self.log
        return log.index_records + (log.size > log.indexed_bytes)

    def record(self, number: int, backward: bool = False) -> Record:
        """Record ``number`` (< count()); ``backward`` when walking towards 0."""
        position = number - self._first
        if 0 <= position < len(self._cached):
            return self._cached[position]
        log = self.log
        if number >= log.index_records:
            return Record(log.indexed_bytes, log.unindexed_time_ns,
                          log.size - log.indexed_bytes, Stream.COMBINED)
        first = max(number - BATCH + 1, 0) if backward else number
        last = min(first + BATCH, log.index_records)
        data = os.pread(log.index_fd, (last - first) * RECORD.size, first * RECORD.size)
        self._first = first
        self._cached = [Record._make(fields) for fields in RECORD.iter_unpack(data)]
        return self._cached[number - first]

    def _probe(self, number: int) -> Record:
        # One record without touching the batch: binary searches jump about.
        if number >= self.log.index_records:
            return self.record(number)
        return read_record(self.log.index_fd, number)

    def locate(self, offset: int) -> int:
        """The number of the record holding byte ``offset`` (count() if none)."""
        low, high = 0, self.count()
        while low < high:
            middle = (low + high) // 2
            if self._probe(middle).end <= offset:
                low = middle + 1
            else:
                high = middle
        return low

    def first_since(self, time_ns: int) -> int:
        """The offset of the first byte read at or after ``time_ns`` (size if none)."""
        low, high = 0, self.count()
        while low < high:
            middle = (low + high) // 2
            if self._probe(middle).time_ns < time_ns:
                low = middle + 1
            else:
                high = middle
        return self._probe(low).offset if low < self.count() else self.log.size

    def view_start(self, selector: Selector, tail_bytes: int, tail_lines: int,
                   since_ns: Optional[int], read: Callable[[int, int], bytes], block: int) -> int:
        """The latest start that the tails and ``since_ns`` ask for, in the
        output there is now; ``read(offset, size)`` reads the log."""
        end = self.log.size
        start = 0
        if tail_bytes:
            start = max(start, self.tail_bytes(end, selector, tail_bytes))
        if tail_lines:
            start = max(start, self.tail_lines(end, selector, tail_lines, read, block))
        if since_ns is not None:
            start = max(start, self.first_since(since_ns))
        return start

    def tail_bytes(self, end: int, selector: Selector, wanted: int) -> int:
        """The offset where the last ``wanted`` selected bytes before ``end`` start."""
        if selector is Selector.ALL:
            return max(end - wanted, 0)
        for record in self._backward(end, selector):
            length = min(record.end, end) - record.offset
            if wanted <= length:
                return record.offset + length - wanted
            wanted -= length
        return 0

    def tail_lines(self, end: int, selector: Selector, wanted: int,
                   read: Callable[[int, int], bytes], block: int) -> int:
        """The offset where the last ``wanted`` lines of the selected streams
        before ``end`` start (a last line without a newline counts, as in tail)."""
        def blocks():
            for record in self._backward(end, selector):
                high = min(record.end, end)
                while high > record.offset:
                    low = max(record.offset, high - block)
                    yield low, read(low, high - low)
                    high = low

        start = last_lines_start(blocks(), wanted)
        return 0 if start is None else start

    def _backward(self, end: int, selector: Selector):
        number = self.locate(end - 1) if end > 0 else -1
        while number >= 0:
            record = self.record(number, backward=True)
            if selector.wants(record.stream):
                yield record
            number -= 1


def last_lines_start(blocks: Iterable[Tuple[int, bytes]], wanted: int) -> Optional[int]:
    """Where the last ``wanted`` lines start, given the output as (offset,
    bytes) blocks from its end backwards; a last line without a newline
    counts, as in tail. None when there are fewer lines: they all are."""
    newlines_left = wanted
    last_byte = True
    for offset, data in blocks:
        if last_byte and data.endswith(b"\n"):
            newlines_left += 1  # ends a line, does not start one
        last_byte = False
        position = len(data)
        while True:
            position = data.rfind(b"\n", 0, position)
            if position < 0:
                break
            newlines_left -= 1
            if newlines_left == 0:
                return offset + position + 1
    return None


def write_chunk(fd: int, data: bytes, index_fd: int, record_number: int, offset: int,
                 time_ns: int, stream: Stream) -> tuple:
    """Write ``data`` to the log, then its record; return (bytes kept, OSError or None).

    Runs in the writers' pool. Bytes whose record cannot be written are cut
    off the log again, so every kept byte has a record.
    """
    view = memoryview(data)
    written, error = 0, None
    try:
        while written < len(view):
            written += os.write(fd, view[written:])
    except OSError as failure:
        error = failure
    if written and index_fd >= 0:
        record = RECORD.pack(offset, time_ns, written, stream)
        position = record_number * RECORD.size
        try:
            if os.pwrite(index_fd, record, position) != len(record):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as failure:
            os.ftruncate(index_fd, position)
            os.ftruncate(fd, offset)
            written, error = 0, failure
    return written, error
