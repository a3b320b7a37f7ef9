"""Stream views (one stream, tails, --since) over a task's output in the fleet.

On one host the output index answers "where do the last N lines start"
directly; in the fleet the output is a replayable subject of chunks, each
labelled with its offset, stream and read time. So a view's start is found
by one replay of what is stored now, keeping only as many trailing chunks
as the tail needs, and the view then follows from that offset, keeping the
chunks of the selected stream. The rules are taskman.output_index's: offsets
count every stream, a last line without a newline counts, the latest start
that the tails and ``since`` ask for wins, never before the asked offset.

One difference: ``since`` is resolved per chunk (up to 64 KiB, dated by its
first byte) rather than per write, so a view may start up to one chunk early.
"""

import collections
from typing import Iterable, Iterator, Optional

from taskman.output import Chunk
from taskman.output_index import Selector, last_lines_start


def view_start(stored: Iterable[Chunk], selector: Selector, tail_bytes: int = 0,
               tail_lines: int = 0, since_ns: Optional[int] = None) -> int:
    """The offset where the view starts, in the output ``stored`` (every
    chunk stored now, in offset order)."""
    kept: collections.deque = collections.deque()  # trailing selected chunks
    kept_bytes = kept_newlines = 0
    since_start = None
    end = 0
    for chunk in stored:
        end = chunk.offset + len(chunk.data)
        if since_ns is not None and since_start is None and chunk.time_ns >= since_ns:
            since_start = chunk.offset
        if not (tail_bytes or tail_lines) or not selector.wants(chunk.stream):
            continue
        kept.append(chunk)
        kept_bytes += len(chunk.data)
        kept_newlines += chunk.data.count(b"\n")
        while len(kept) > 1:  # drop the oldest while the rest still holds the tails
            oldest = kept[0]
            if (kept_bytes - len(oldest.data) < tail_bytes
                    or kept_newlines - oldest.data.count(b"\n") < tail_lines + 1):
                break
            kept.popleft()
            kept_bytes -= len(oldest.data)
            kept_newlines -= oldest.data.count(b"\n")
    start = 0
    if tail_bytes:
        start = max(start, _tail_bytes(kept, tail_bytes))
    if tail_lines:
        start = max(start, _tail_lines(kept, tail_lines))
    if since_ns is not None:
        start = max(start, since_start if since_start is not None else end)
    return start


def _tail_bytes(kept, wanted: int) -> int:
    for chunk in reversed(kept):
        if wanted <= len(chunk.data):
            return chunk.offset + len(chunk.data) - wanted
        wanted -= len(chunk.data)
    return kept[0].offset if kept else 0


def _tail_lines(kept, wanted: int) -> int:
    start = last_lines_start(((chunk.offset, chunk.data) for chunk in reversed(kept)), wanted)
    if start is not None:
        return start
    return kept[0].offset if kept else 0


def selected(chunks: Iterable[Chunk], selector: Selector) -> Iterator[Chunk]:
    """Only the chunks of the selected stream (all of them for ALL)."""
    for chunk in chunks:
        if selector.wants(chunk.stream):
            yield chunk
