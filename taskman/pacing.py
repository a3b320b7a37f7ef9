"""Pacing: who is active on the server, and token buckets.

The sharing of the server (taskman.turns) holds a user back only while
other users are active, so it needs to know who has been: ``Activity``. A
flood is paced, not refused (a refused call comes back at once and its
client calls again), by a ``Bucket`` per user.
"""

import collections
import time
from typing import Callable, Dict, Optional

ACTIVE_WINDOW = 0.2  # seconds


class Activity:
    """Which users made a call or sent output in the last ``window`` seconds.

    Kept oldest first, so forgetting the stale ones costs nothing per call
    however many users have come and gone.
    """

    def __init__(self, window: float = ACTIVE_WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self._seen: Dict[str, float] = collections.OrderedDict()

    def saw(self, user: str, now: Optional[float] = None) -> None:
        self._seen[user] = self.clock() if now is None else now
        self._seen.move_to_end(user)

    def others(self, user: str, now: Optional[float] = None) -> bool:
        """Whether a user other than ``user`` was active within the window."""
        now = self.clock() if now is None else now
        seen = self._seen
        while seen:
            oldest, when = next(iter(seen.items()))
            if now - when <= self.window:
                break
            del seen[oldest]
        return len(seen) > (1 if user in seen else 0)

    def active(self, user: str) -> bool:
        """Whether ``user`` is still remembered as active (stale ones go lazily)."""
        return user in self._seen


class Bucket:
    """A token bucket: ``rate`` a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.filled = burst, now

    def ready(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.filled) * self.rate)
        self.filled = now
        return self.tokens >= 1

    def spend(self) -> None:
        self.tokens = max(0.0, self.tokens - 1)
