"""Turns at sending stream output: a few streams at a time, round-robin by user.

Every message a stream sends, and every call's request and reply, passes
through the gRPC server's one completion queue, served in arrival order by
one loop (docs/design.md). Thirty-two streams on a fast writer kept about as
many sends queued there at every moment, and each other call's events waited
behind them: a quiet user's GetTaskStatus took 25-30x longer while another
user followed a fast writer, though its handler still ran in under 5 ms.

So a stream takes a turn before each message and holds it until the send
is done (its generator is resumed) or ``hold`` seconds have passed, whichever
comes first: a client that does not read holds a turn for ``hold`` at most.
At most ``slots`` turns are out at once, so at most that many stream sends
are queued ahead of anybody's next call; the waiting streams are served
round-robin by user, so a user's share of the sending does not grow with the
number of streams it opens. One stream alone is never held back: it only
ever has one message in flight anyway.
"""

import collections
import contextlib
from typing import Deque, Dict, Iterator

import gevent
import gevent.event

DEFAULT_SLOTS = 2
DEFAULT_HOLD = 0.05  # seconds


class SendTurns:
    """Grants turns at sending, ``slots`` at a time, fairly among users."""

    def __init__(self, slots: int = DEFAULT_SLOTS, hold: float = DEFAULT_HOLD):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.hold = hold
        self.free = slots
        # user -> its streams waiting for a turn, users in the order they are served
        self._waiting: Dict[str, Deque[gevent.event.Event]] = collections.OrderedDict()

    @contextlib.contextmanager
    def turn(self, user: str) -> Iterator[None]:
        """Wait for a turn of ``user``'s, hold it for the body (at most ``hold`` s)."""
        self._take(user)
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._pass_on()

        timer = gevent.get_hub().loop.timer(self.hold)
        timer.start(give_back)
        try:
            yield
        finally:
            timer.close()
            give_back()

    def waiting(self) -> int:
        """How many streams wait for a turn."""
        return sum(len(queue) for queue in self._waiting.values())

    def _take(self, user: str) -> None:
        if self.free and not self._waiting:
            self.free -= 1
            return
        granted = gevent.event.Event()
        self._waiting.setdefault(user, collections.deque()).append(granted)
        try:
            granted.wait()
        except BaseException:  # killed or cancelled while waiting
            if granted.is_set():
                self._pass_on()  # the turn came meanwhile: not ours to keep
            else:
                self._forget(user, granted)
            raise

    def _pass_on(self) -> None:
        """A turn ends: give it to the next user's first waiting stream, or free it."""
        if not self._waiting:
            self.free += 1
            return
        user, queue = next(iter(self._waiting.items()))
        del self._waiting[user]
        granted = queue.popleft()
        if queue:
            self._waiting[user] = queue  # to the back of the line
        granted.set()

    def _forget(self, user: str, granted: gevent.event.Event) -> None:
        queue = self._waiting.get(user)
        if queue is None:
            return
        try:
            queue.remove(granted)
        except ValueError:
            pass
        if not queue:
            del self._waiting[user]
