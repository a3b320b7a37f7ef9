"""What readers of an output log get: Chunks, through iterators that hold
the log from the moment they are made.

A plain generator runs nothing until first iterated, and a generator closed
before that never runs its ``finally``: a reader reference taken inside one
would leave a stream accepted but not yet reading unprotected (retention
could delete its log: "output unavailable"), and one released inside one
could leak. ``Held`` takes the reference's release from its creator, who
acquired it already, and gives it back exactly once: when the iterator is
exhausted, fails, is closed or is collected.
"""

import os
import time
from typing import Callable, Iterator, NamedTuple, Optional

import gevent
import gevent.event

from taskman.output_index import Stream

# A stream's messages cost ~60 us each under gevent (docs/design.md), so one
# follower alone is bound by how many it sends: 256 KiB messages reach the
# bare transport's throughput where 64 KiB ones reach 0.7 of it. But a
# stream waiting for its send turn holds the chunk it has read, so with many
# readers at once (1,000 followers of a fast writer) chunks stay at 64 KiB.
CHUNK_SIZE = 64 * 1024
LARGE_CHUNK_SIZE = 256 * 1024
FEW_READERS = 8  # readers of all logs together that may read large chunks

# A follower that has caught up with a chatty task waits this long after its
# last message before sending the next, unless a whole chunk is waiting: a
# task printing a line a millisecond then costs each follower ~125 messages a
# second, not 1,000, for at most this much latency; the first output after a
# silence goes at once. Under the 10 ms within which records share a chunk
# (output._MERGE_NS), so what waited goes as one message (docs/design.md).
LINGER = 0.008  # seconds

_readers = 0  # readers of every log in this process


def count_reader(change: int) -> None:
    """A reader of some log starts (+1) or ends (-1)."""
    global _readers
    _readers += change


def chunk_size() -> int:
    """How much a reader reads at a time now: more while few read at all."""
    return LARGE_CHUNK_SIZE if _readers <= FEW_READERS else CHUNK_SIZE


def await_more(log, offset: int, changed: gevent.event.Event,
               cancelled: Optional[gevent.event.Event], sent_at: float, size: int = 0) -> None:
    """Wait until ``changed`` (the log grew or finished) or ``cancelled``; then
    linger until ``sent_at`` + LINGER while less than a chunk (``size``, 0:
    chunk_size()) is waiting."""
    if cancelled is None:
        changed.wait()
    else:
        gevent.wait([changed, cancelled], count=1)
    rest = sent_at + LINGER - time.monotonic()
    if rest <= 0 or log.finished or log.size - offset >= (size or chunk_size()):
        return
    if cancelled is None:
        gevent.sleep(rest)
    else:
        cancelled.wait(rest)


class Chunk(NamedTuple):
    """Output bytes and where they came from; a chunk never mixes two streams."""

    offset: int  # of its first byte in the task's combined output
    stream: Stream
    time_ns: int  # when the server read its first byte, ns since the epoch
    data: bytes


class Recent:
    """The bytes a log appended last, kept while someone reads the log: a
    follower that keeps up takes them from here instead of a pread of what
    was just written (one copy of 1 GiB less, and 1,000 followers of one
    task share one object instead of holding a copy each)."""

    __slots__ = ("start", "data")

    def __init__(self):
        self.forget()

    def keep(self, start: int, data: bytes) -> None:
        self.start, self.data = start, data

    def forget(self) -> None:
        self.start, self.data = 0, b""

    def read(self, fd: int, start: int, stop: int) -> bytes:
        """The log's bytes from ``start`` to ``stop``: these if they hold them, else read."""
        begin, end = start - self.start, stop - self.start
        if begin < 0 or end > len(self.data):
            return os.pread(fd, stop - start, start)
        return self.data if begin == 0 and end == len(self.data) else self.data[begin:end]


class Held:
    """Iterate ``iterator``; call ``release`` once when it is done or closed."""

    def __init__(self, iterator: Iterator, release: Callable[[], None]):
        self._iterator = iterator
        self._release = release

    def __iter__(self) -> "Held":
        return self

    def __next__(self):
        if self._release is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
        finally:
            release()

    def __del__(self):
        self.close()


def data_only(chunks) -> Held:
    """The bytes of ``chunks`` (Chunks); closing this closes them (and frees their log)."""
    return Held((chunk.data for chunk in chunks), chunks.close)
