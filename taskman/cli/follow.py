"""Following a task's output across lost connections, for ``taskman stream``
and ``taskman run``.

Every output message says where its bytes sit in the task's combined output,
so when the server goes away (UNAVAILABLE or a server-side CANCELLED: a
restart, a reload, a dropped connection, a replica killed) the follower asks
again from the offset it reached and gets each byte exactly once. Given
several addresses (replicas of one fleet), each retry goes to the next one.
The first retry is immediate (another replica, or a reloaded server, is
usually there already); later ones back off, bounded, with a note on stderr
each time. With one address, a server that says it is reloading, or that
went away without a word, is first asked again every 0.1 s (a reload's
outage is about a second; the first retry sooner by as long as the follower
was behind its task), so a follower's pause is the reload's.
"""

import datetime
import re
import sys
import time
from typing import Callable, Optional

RETRIES = 11  # in a row without a byte received: about 15 s in all
FIRST_PAUSE = 0.2  # seconds before the second retry, doubled after each failed one
LONGEST_PAUSE = 2.0
# A server going away ends streams with UNAVAILABLE, or with CANCELLED when
# it cancels the calls still open as it stops (the client never raises its
# own cancellation: it closes the iterator). Asking again settles which: a
# revoked certificate then reads UNAUTHENTICATED, a removed task NOT_FOUND.
RESUMABLE = ("UNAVAILABLE", "CANCELLED")
# A server that says it is reloading (SIGHUP) is back within seconds, at the
# same address: with no other address to go to, it is asked again every
# RELOAD_PAUSE until RELOAD_WAIT has passed, quietly, so the follower's pause
# is the reload's and not a back-off's.
RELOADING = "reloading"
RELOAD_WAIT = 60.0  # seconds; a loaded (or emulated) host may take tens
RELOAD_PAUSE = 0.1
# A server that went away without saying so may be reloading too: its stop
# cancels a stream still waiting to send when the drain came (a loaded
# server, a follower behind its task). With no other address to go to, such
# a loss is retried every RELOAD_PAUSE for QUICK_WAIT first (a reload's
# outage here is about a second), then backs off as above.
QUICK_WAIT = 3.0  # seconds


class Follower:
    """Streams ``task_id`` from ``client`` (a taskman.client.TaskmanClient)
    into ``write(chunk)``; ``offset`` is where the next byte would start."""

    def __init__(self, client, task_id: str, write: Callable, *, offset: int = 0,
                 selector: str = "all", tail_lines: int = 0, since=None, follow: bool = True,
                 connected: bool = False,
                 note: Callable[[str], None] = lambda text: print(text, file=sys.stderr)):
        self.client = client
        self.task_id = task_id
        self.write = write
        self.offset = offset
        self.selector = selector
        self.tail_lines = tail_lines
        self.since = since
        self.follow = follow
        self.note = note
        # Only a server that answered once is waited for: an address where
        # none ever was fails at once, as before.
        self.connected = connected
        self.read_at = None  # when the server read the last bytes received (a reload's first pause)

    def run(self) -> None:
        """Until the stream ends; raises the last ClientError when the
        servers stay unreachable, or at once for any other failure."""
        failures = 0
        untried = len(getattr(self.client, "addresses", ())) - 1
        reload_ends = 0.0  # while the server is known (or may be) reloading
        quick = True  # the next loss of a server that answered gets QUICK_WAIT
        while True:
            reached = self.offset
            try:
                self._stream_once()
                return
            except Exception as error:
                if getattr(getattr(error, "code", None), "name", "") not in RESUMABLE:
                    raise
                if self.offset != reached:
                    failures = 0  # bytes came through: the budget is for a lasting loss
                    quick = True
                lost = self.client.address
                message = error.message.strip() or "unavailable"
                if RELOADING in message and self.connected and untried <= 0:
                    reload_ends = time.monotonic() + RELOAD_WAIT
                    quick = False
                    self.note(f"taskman: {lost}: {message}; reconnecting from offset "
                              f"{self.offset} (waiting up to {RELOAD_WAIT:g}s)")
                elif quick and self.connected and untried <= 0 and failures == 0:
                    reload_ends = time.monotonic() + QUICK_WAIT
                    quick = False
                    self.note(f"taskman: lost the server at {lost} ({message}); reconnecting "
                              f"from offset {self.offset} every {RELOAD_PAUSE:g}s for "
                              f"{QUICK_WAIT:g}s, then backing off")
                    continue  # at once: a dropped connection to a server still there
                if time.monotonic() < reload_ends:
                    time.sleep(self._pause())
                    # A fresh channel connects at once: the old one would
                    # wait out grpc's reconnect backoff (up to 1 s), which
                    # grows while the server is down and so outlasts it.
                    self._fresh_channel()
                    continue
                if not self.connected:
                    # Never answered: try each other address once, at once.
                    if untried <= 0:
                        raise
                    untried -= 1
                    self.note(f"taskman: cannot reach {lost} ({message}); trying "
                              f"{self._next_address()}")
                    continue
                failures += 1
                if failures > RETRIES:
                    raise
                pause = 0.0 if failures == 1 else min(FIRST_PAUSE * 2 ** (failures - 2),
                                                      LONGEST_PAUSE)
                self.note(f"taskman: lost the server at {lost} ({message}); reconnecting from "
                          f"offset {self.offset} to {self._next_address()} in {pause:.1f}s "
                          f"(attempt {failures} of {RETRIES})")
                time.sleep(pause)

    def _pause(self) -> float:
        """RELOAD_PAUSE, less what has passed since the server read the last
        bytes received (a chunk's ``time``): a follower behind its task
        learns of a reload late, when the server may be back already. A
        clock set apart from the server's costs one early attempt at most."""
        read_at, self.read_at = self.read_at, None
        if read_at is None:
            return RELOAD_PAUSE
        behind = (datetime.datetime.now(datetime.timezone.utc) - read_at).total_seconds()
        return min(max(RELOAD_PAUSE - behind, 0.0), RELOAD_PAUSE)

    def _fresh_channel(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()  # the next call makes a new channel

    def _next_address(self) -> str:
        fail_over = getattr(self.client, "fail_over", None)
        return fail_over() if fail_over else self.client.address

    def _stream_once(self) -> None:
        # The tail and since views pick the start once; a reconnection goes
        # on from the offset reached, whatever the output's end is by then.
        chunks = self.client.chunks(self.task_id, offset=self.offset, selector=self.selector,
                                    tail_lines=self.tail_lines, since=self.since,
                                    follow=self.follow)
        try:
            for chunk in chunks:
                self.connected = True
                self.write(chunk)
                self.offset = chunk.end
                self.read_at = getattr(chunk, "time", None)
                self.tail_lines, self.since = 0, None
        finally:
            chunks.close()  # cancels the call if we leave early (Ctrl-C, closed pipe)


def parse_count(value: Optional[str], option: str, error) -> int:
    """A whole number option (0 when absent); ``error(text)`` for anything else."""
    if value is None:
        return 0
    if not value.isdigit() or int(value) > 2 ** 63 - 1:
        raise error(f"invalid {option} {value!r}: expected a whole number")
    return int(value)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: Optional[str], error, now=None) -> Optional[datetime.datetime]:
    """``--since``: an RFC 3339 time (2026-01-02T03:04:05Z) or a duration
    before now such as 90s, 5m, 1h30m or 2d; None when absent."""
    if value is None:
        return None
    match = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)
    if value and match:
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        ago = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        return (now or datetime.datetime.now(datetime.timezone.utc)) - ago
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise error(f"invalid --since {value!r}: expected an RFC 3339 time with its offset "
                    "(e.g. 2026-01-02T03:04:05Z) or a duration such as 30s, 5m, 1h30m, 2d")
    return moment
