"""Turns: a few at a time, round-robin by user, at sending stream output and
at running calls.

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

Calls take turns too (``CallTurns``), but per user and paced. A quiet
user's GetTaskStatus ran in under 1 ms in its handler yet took 7-12x longer
at its client while another user's 16 threads sent StopTask back to back
(~300 calls a second): each call's request and reply cost the loop far more
than its handler, so the loop was busy with the flood whenever the quiet
call's events arrived, however the handlers were ordered. Only fewer of the
flooder's calls help: while others are active, a user's turn rests after
each call (three times as long as the call took), so its calls, however
many clients send them, keep the loop busy a quarter of the time per turn.
"""

import collections
import contextlib
import time
from typing import Callable, Deque, Dict, Iterator

import gevent
import gevent.event

DEFAULT_SLOTS = 2
DEFAULT_HOLD = 0.05  # seconds
CALL_SLOTS = 2  # per user
CALL_HOLD = 0.05  # seconds
CALL_REST = 3.0  # times the call's own time
ACTIVE_WINDOW = 0.2  # seconds


class Turns:
    """Grants turns, ``slots`` at a time, fairly among users."""

    def __init__(self, slots: int = DEFAULT_SLOTS, hold: float = DEFAULT_HOLD):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.hold = hold
        self.free = slots
        # user -> its waiters (streams or calls), users in the order they are served
        self._waiting: Dict[str, Deque[gevent.event.Event]] = collections.OrderedDict()

    @contextlib.contextmanager
    def turn(self, user: str) -> Iterator[None]:
        """Wait for a turn of ``user``'s, hold it for the body (at most ``hold`` s)."""
        give_back = self.take(user)
        try:
            yield
        finally:
            give_back()

    def take(self, user: str) -> Callable[[], None]:
        """Wait for a turn of ``user``'s; return what gives it back, which
        may be called more than once, from any greenlet (only the first call
        counts). The turn passes on by itself after ``hold`` seconds."""
        self._take(user)
        given_back = False
        timer = gevent.get_hub().loop.timer(self.hold)

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                timer.close()
                self._pass_on()

        timer.start(give_back)
        return give_back

    def idle(self) -> bool:
        """Nothing held, nobody waiting."""
        return self.free == self.slots and not self._waiting

    def waiting(self) -> int:
        """How many wait for a turn."""
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
        """A turn ends: give it to the next user's first waiter, or free it."""
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


class CallTurns:
    """Each user's calls run ``slots`` at a time, the rest wait in line;
    while other users are active, each turn rests after its call.

    Unlike a stream's send, a turn here is per user (a user's calls never
    wait for another user's), and is held for the call's whole life, its
    reply included (``take`` returns what gives it back; the servicer calls
    it when the call ends), at most ``hold`` seconds. While another user has
    had a call within ``window`` seconds and more of this user's calls wait
    in line, a turn given back rests ``rest`` times as long as its call took
    before the next call may have it, so the user keeps calls in flight at
    most 1 / (1 + ``rest``) of the time per slot: a flood of calls, however
    many clients send it, leaves the server's loop idle most of the time for
    the others. Alone, or with no more calls than slots, a user is never
    slowed.
    """

    def __init__(self, slots: int = CALL_SLOTS, hold: float = CALL_HOLD,
                 rest: float = CALL_REST, window: float = ACTIVE_WINDOW,
                 clock: Callable[[], float] = time.monotonic):
        self.slots = slots
        self.hold = hold
        self.rest = rest
        self.window = window
        self.clock = clock
        self._users: Dict[str, Turns] = {}
        self._seen: Dict[str, float] = {}  # user -> when a call of theirs last ended

    def take(self, user: str) -> Callable[[], None]:
        """Wait for one of ``user``'s turns; return what gives it back."""
        turns = self._users.get(user)
        if turns is None:
            turns = self._users[user] = Turns(self.slots, self.hold)
        pass_on = turns.take(user)
        began = self.clock()
        given_back = False

        def finish() -> None:
            pass_on()
            if turns.idle() and self._users.get(user) is turns:
                del self._users[user]  # kept only while the user has calls

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            ended = self.clock()
            self._seen[user] = ended
            # Only a user whose own calls queue for its turns is slowed: one
            # that never fills its slots (one call at a time) is not flooding.
            flooding = turns.waiting() and self._others_active(user, ended)
            pause = (ended - began) * self.rest if flooding else 0
            if pause > 0:
                gevent.spawn_later(pause, finish)
            else:
                finish()

        return give_back

    def waiting(self) -> int:
        """How many calls wait for a turn."""
        return sum(turns.waiting() for turns in self._users.values())

    def _others_active(self, user: str, now: float) -> bool:
        active = False
        for other, seen in list(self._seen.items()):
            if now - seen > self.window:
                del self._seen[other]
            elif other != user:
                active = True
        return active or any(other != user for other in self._users)
