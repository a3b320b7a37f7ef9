"""Turns: a few at a time, round-robin by user, at sending stream output and
at running calls, and a pace for a user who floods while others are active.

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
ever has one message in flight anyway. While other users are active, each
user's sends are also paced (``rate`` messages a second, all its streams
together): a turn bounds how many sends are queued, not how many a second
the loop makes.

Calls take turns too (``CallTurns``), per user and only while others are
active. A quiet user's GetTaskStatus ran in under 1 ms in its handler yet
took 7-12x longer at its client while another user's 16 threads sent
StopTask back to back (~300 calls a second): each call's request and reply
cost the loop far more than its handler, so the loop was busy with the flood
whenever the quiet call's events arrived, however the handlers were ordered.
Only fewer of the flooder's calls help, so a user whose calls queue behind
its own is paced while others are active. A user alone on the server is
held to nothing but its calls-in-flight quota (taskman.quotas).
"""

import collections
import contextlib
import itertools
import time
from typing import Callable, Deque, Dict, Iterator, List, Optional

import gevent
import gevent.event
import gevent.lock

from taskman.defaults import DEFAULT_CALL_RATE, DEFAULT_SEND_RATE
from taskman.pacing import ACTIVE_WINDOW, Activity, Bucket

DEFAULT_SLOTS = 2
DEFAULT_HOLD = 0.05  # seconds
SEND_RATE = DEFAULT_SEND_RATE  # messages a second per user while others are active; 0: no pace
CALL_SLOTS = 2  # per user, while others are active
CALL_HOLD = 0.05  # seconds
CALL_REST = 3.0  # times the call's own time
CALL_RATE = DEFAULT_CALL_RATE  # calls a second per queueing user while others are active; 0: no pace
CALL_BURST = 10  # calls
TICK = 0.005  # seconds between a waiting user's checks for a free turn


class Turns:
    """Grants turns, ``slots`` at a time, fairly among users; while others
    are active (``activity``), each user's turns come ``rate`` a second at most."""

    def __init__(self, slots: int = DEFAULT_SLOTS, hold: float = DEFAULT_HOLD,
                 rate: float = SEND_RATE, burst: float = CALL_BURST,
                 activity: Optional[Activity] = None, clock: Callable[[], float] = time.monotonic):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.hold = hold
        self.rate, self.burst = rate, burst
        self.activity = activity or Activity(clock=clock)
        self.clock = clock
        self.free = slots
        # user -> its waiters (streams or calls), users in the order they are served
        self._waiting: Dict[str, Deque[gevent.event.Event]] = collections.OrderedDict()
        # Turns out -> when each passes on by itself, oldest first: one timer
        # for all of them, not one per turn (a turn is taken for every message).
        self._held: Dict[int, float] = {}
        self._numbers = itertools.count()
        self._timer = None
        self._buckets: Dict[str, tuple] = {}  # user -> (Bucket, its streams' line)

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
        counts). The turn passes on by itself after ``hold`` seconds (at
        most half as long again)."""
        self._paced(user)
        self._take(user)
        number = next(self._numbers)
        self._held[number] = self.clock() + self.hold
        self._watch()

        def give_back() -> None:
            if self._held.pop(number, None) is not None:
                self._pass_on()

        return give_back

    def idle(self) -> bool:
        """Nothing held, nobody waiting."""
        return self.free == self.slots and not self._waiting

    def waiting(self) -> int:
        """How many wait for a turn."""
        return sum(len(queue) for queue in self._waiting.values())

    def _paced(self, user: str) -> None:
        """While others are active, wait until ``user`` may send again."""
        now = self.clock()
        self.activity.saw(user, now)
        if self.rate <= 0:
            return
        if not self.activity.others(user, now):
            self._buckets.pop(user, None)  # alone: not paced, nothing to remember
            return
        paced = self._buckets.get(user)
        if paced is None:
            for gone in [name for name in self._buckets if not self.activity.active(name)]:
                del self._buckets[gone]
            paced = self._buckets[user] = (Bucket(self.rate, self.burst, now),
                                           gevent.lock.Semaphore())
        bucket, line = paced
        # One of the user's streams waits on the clock at a time, the others
        # in line behind it: not each waking for every token.
        with line:
            while not bucket.ready(now) and self.activity.others(user, now):
                gevent.sleep((1 - bucket.tokens) / self.rate)
                now = self.clock()
            bucket.spend()

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

    def _watch(self) -> None:
        if self._timer is None:
            self._timer = gevent.get_hub().loop.timer(self.hold / 2, self.hold / 2)
        if not self._timer.active:
            self._timer.start(self._expire)

    def _expire(self) -> None:
        """Pass on the turns held past ``hold``; rest once none is held."""
        now = self.clock()
        while self._held:
            number, deadline = next(iter(self._held.items()))
            if deadline > now:
                return
            del self._held[number]
            self._pass_on()
        self._timer.stop()

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


class _Waiter:
    __slots__ = ("event", "number")

    def __init__(self):
        self.event = gevent.event.Event()
        self.number: Optional[int] = None  # the turn it was given


class _UserCalls:
    """One user's calls: running (number -> when it began), slots resting
    (when each is free again), waiting, its pace, its one timer."""

    __slots__ = ("running", "resting", "waiting", "bucket", "timer")

    def __init__(self, bucket: Bucket):
        self.running: Dict[int, float] = {}
        self.resting: List[float] = []
        self.waiting: Deque[_Waiter] = collections.deque()
        self.bucket = bucket
        self.timer = None


class CallTurns:
    """A user's calls run at once while it is alone; while other users are
    active, ``slots`` at a time, the rest wait in line, paced.

    A turn is per user (a user's calls never wait for another user's) and is
    held for the call's whole life, its reply included (``take`` returns what
    gives it back; the servicer calls it when the call ends), at most
    ``hold`` seconds. While another user has been active within the
    activity's window:

    - a call of a user that has none running or waiting runs at once: a user
      making one call at a time is not flooding and is never slowed;
    - otherwise at most ``slots`` of the user's calls run at once, and a
      call that queues waits for ``rate`` a second (``burst`` saved up), and
      a turn given back while more calls wait rests ``rest`` times as long
      as its call took: a flood of calls, however many clients send it,
      leaves the server's loop idle most of the time for the others.

    A user alone on the server is held to none of this (only to its
    calls-in-flight quota): the sharing gives away nothing nobody else wants.
    """

    def __init__(self, slots: int = CALL_SLOTS, hold: float = CALL_HOLD,
                 rest: float = CALL_REST, window: float = ACTIVE_WINDOW,
                 clock: Callable[[], float] = time.monotonic, rate: float = CALL_RATE,
                 burst: float = CALL_BURST, activity: Optional[Activity] = None,
                 tick: float = TICK):
        self.slots = slots
        self.hold = hold
        self.rest = rest
        self.rate, self.burst = rate, burst
        self.clock = clock
        self.activity = activity or Activity(window, clock)
        self.tick = tick
        self._users: Dict[str, _UserCalls] = {}
        self._numbers = itertools.count()

    def take(self, user: str) -> Callable[[], None]:
        """Wait for one of ``user``'s turns; return what gives it back (any
        number of times, from any greenlet: only the first counts)."""
        now = self.clock()
        self.activity.saw(user, now)
        calls = self._users.get(user)
        if calls is None:
            calls = self._users[user] = _UserCalls(Bucket(self.rate, self.burst, now))
        if not calls.running and not calls.waiting:
            number = self._run(calls, now)  # one call at a time is never slowed
        elif not calls.waiting and self._may_run(user, calls, now):
            number = self._run(calls, now)
        else:
            number = self._wait(user, calls)
        return lambda: self._give_back(user, calls, number)

    def waiting(self) -> int:
        """How many calls wait for a turn."""
        return sum(len(calls.waiting) for calls in self._users.values())

    def _may_run(self, user: str, calls: _UserCalls, now: float) -> bool:
        if not self.activity.others(user, now):
            return True  # alone: only the calls-in-flight quota applies
        self._expire(calls, now)
        return (len(calls.running) + len(calls.resting) < self.slots
                and calls.bucket.ready(now))

    def _run(self, calls: _UserCalls, now: float) -> int:
        number = next(self._numbers)
        calls.running[number] = now
        calls.bucket.ready(now)
        calls.bucket.spend()
        return number

    def _wait(self, user: str, calls: _UserCalls) -> int:
        waiter = _Waiter()
        calls.waiting.append(waiter)
        self._watch(user, calls)
        try:
            waiter.event.wait()
        except BaseException:  # killed or cancelled while waiting
            if waiter.number is not None:
                self._give_back(user, calls, waiter.number)  # came meanwhile: not ours
            else:
                calls.waiting.remove(waiter)
                self._release(user, calls)
            raise
        return waiter.number

    def _give_back(self, user: str, calls: _UserCalls, number: int) -> None:
        began = calls.running.pop(number, None)
        if began is None:
            return  # given back already, or held past ``hold``
        now = self.clock()
        self.activity.saw(user, now)
        # Only a user whose own calls queue for its turns rests.
        if self.rest > 0 and calls.waiting and self.activity.others(user, now):
            calls.resting.append(now + (now - began) * self.rest)
        self._release(user, calls)

    def _release(self, user: str, calls: _UserCalls) -> None:
        """Let waiting calls run as far as the turns allow; keep the user's
        timer ticking while some still wait; forget an idle user."""
        now = self.clock()
        while calls.waiting and self._may_run(user, calls, now):
            waiter = calls.waiting.popleft()
            waiter.number = self._run(calls, now)
            waiter.event.set()
        if calls.waiting:
            self._watch(user, calls)
            return
        if calls.timer is not None:
            calls.timer.stop()
        # Rests only hold back calls that wait: with none waiting, the next
        # call finds nothing running and runs at once anyway.
        if not calls.running and self._users.get(user) is calls:
            if calls.timer is not None:
                calls.timer.close()
            del self._users[user]  # kept only while the user has calls

    def _expire(self, calls: _UserCalls, now: float) -> None:
        """Forget rests that are over and calls held past ``hold``."""
        if calls.resting:
            calls.resting = [until for until in calls.resting if until > now]
        while calls.running:
            number, began = next(iter(calls.running.items()))
            if now - began < self.hold:
                break
            del calls.running[number]

    def _watch(self, user: str, calls: _UserCalls) -> None:
        """Tick while calls wait: rests end, tokens come and others leave
        with no call of this user's to notice them."""
        if calls.timer is None:
            calls.timer = gevent.get_hub().loop.timer(self.tick, self.tick)
        if not calls.timer.active:
            calls.timer.start(self._release, user, calls)
