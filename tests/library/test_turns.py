"""Turns (taskman/turns.py): at sending stream output, a few at a time, handed
round-robin by user, never held past ``hold``, given back when a waiter dies;
at running calls, a few of each user's at a time, resting while others are
active."""

import time

import gevent
import pytest

from taskman.turns import Activity, CallTurns, Turns

pytestmark = pytest.mark.timeout(10)


def test_a_lone_stream_never_waits():
    turns = Turns(slots=1, hold=5)
    for _ in range(100):
        with turns.turn("client001"):
            pass
    assert turns.free == 1 and turns.waiting() == 0


def test_at_most_slots_turns_are_out_at_once():
    turns = Turns(slots=2, hold=5)
    holding = []
    most = []

    def stream(index):
        with turns.turn("client001"):
            holding.append(index)
            most.append(len(holding))
            gevent.sleep(0.01)
            holding.remove(index)

    gevent.joinall([gevent.spawn(stream, index) for index in range(8)], raise_error=True)
    assert max(most) == 2
    assert turns.free == 2


def test_waiting_streams_are_served_round_robin_by_user():
    """A user with many streams gets one turn in line, as one with a single stream."""
    turns = Turns(slots=1, hold=5)
    order = []

    def stream(user):
        with turns.turn(user):
            order.append(user)
            gevent.sleep(0.001)

    with turns.turn("blocker"):  # everyone below queues
        greenlets = [gevent.spawn(stream, "client001") for _ in range(6)]
        gevent.sleep(0)
        greenlets.append(gevent.spawn(stream, "client002"))
        greenlets.append(gevent.spawn(stream, "client002"))
        gevent.sleep(0)
        assert turns.waiting() == 8
    gevent.joinall(greenlets, raise_error=True)
    assert order[:4] == ["client001", "client002", "client001", "client002"]
    assert order[4:] == ["client001"] * 4


def test_a_turn_held_too_long_passes_on_after_hold():
    """A stream whose client does not read cannot hold up the others."""
    turns = Turns(slots=1, hold=0.05)
    got = []

    def stuck():
        with turns.turn("client001"):
            gevent.sleep(3)

    def other():
        with turns.turn("client002"):
            got.append(True)

    blocker = gevent.spawn(stuck)
    gevent.sleep(0)
    waiting = gevent.spawn(other)
    waiting.join(timeout=1)
    assert got == [True]
    blocker.kill()
    assert turns.free == 1  # the late exit of the stuck one gives nothing back twice


def test_one_timer_serves_every_turn():
    """A turn is taken for every message: no timer is made per turn."""
    turns = Turns(slots=2, hold=5)
    with turns.turn("client001"):
        timer = turns._timer
    for _ in range(100):
        with turns.turn("client001"):
            assert turns._timer is timer


def test_while_another_user_is_active_a_users_sends_are_paced():
    activity = Activity()
    turns = Turns(slots=2, hold=5, rate=200, burst=1, activity=activity)
    began = time.monotonic()
    for _ in range(20):
        with turns.turn("client001"):
            pass
    assert time.monotonic() - began < 0.05  # alone: not paced
    for _ in range(21):
        activity.saw("client002")
        with turns.turn("client001"):
            pass
    assert 0.08 <= time.monotonic() - began < 1  # 20 of them at 200 a second


def test_a_waiter_killed_in_line_leaves_no_turn_behind():
    turns = Turns(slots=1, hold=5)
    with turns.turn("client001"):
        waiter = gevent.spawn(lambda: turns.turn("client002").__enter__())
        gevent.sleep(0)
        assert turns.waiting() == 1
        waiter.kill()
        assert turns.waiting() == 0
    assert turns.free == 1


# -- calls: each user's own turns, resting while others are active


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_users_calls_run_slots_at_a_time_and_never_wait_for_another_users():
    turns = CallTurns(slots=2, hold=5, rest=0)
    turns.take("client002")()  # another user is active: the turns apply
    first, second = turns.take("client001"), turns.take("client001")
    third = gevent.spawn(turns.take, "client001")
    gevent.sleep(0.01)
    assert not third.ready() and turns.waiting() == 1
    turns.take("client002")()  # another user's turn is its own
    first()
    assert third.get(timeout=1) is not None
    second()
    third.value()
    assert turns.waiting() == 0 and not turns._users  # nothing kept for idle users


def test_a_user_alone_is_not_held_to_the_slots():
    """Work-conserving: alone, only the calls-in-flight quota (not here) applies."""
    turns = CallTurns(slots=2, hold=5, rest=3)
    taken = [gevent.spawn(turns.take, "client001") for _ in range(20)]
    gevent.sleep(0.01)
    assert all(greenlet.ready() for greenlet in taken) and turns.waiting() == 0
    for greenlet in taken:
        greenlet.value()
    assert not turns._users


def test_the_turns_start_when_another_user_comes_and_end_when_it_goes():
    clock = FakeClock()
    turns = CallTurns(slots=2, hold=5, rest=0, window=1, clock=clock, tick=0.001)
    alone = [turns.take("client001") for _ in range(4)]  # alone: all four run
    turns.take("client002")()  # now another user is active
    waiter = gevent.spawn(turns.take, "client001")
    gevent.sleep(0.01)
    assert not waiter.ready()  # four of its calls run: past its 2 slots
    for give_back in alone[:2]:
        give_back()
    gevent.sleep(0.01)
    assert not waiter.ready()  # still two running
    clock.now += 2  # client002 has gone: the waiter runs without a call ending
    assert waiter.get(timeout=1) is not None
    for give_back in alone[2:] + [waiter.value]:
        give_back()
    assert not turns._users


def test_while_another_user_is_active_a_queueing_user_is_paced_at_its_rate():
    turns = CallTurns(slots=4, hold=5, rest=0, rate=100, burst=1, tick=0.001)
    turns.take("client002")()
    began = time.monotonic()

    def call():
        give_back = turns.take("client001")
        turns.take("client002")()  # the other user stays active
        gevent.sleep(0.001)
        give_back()

    gevent.joinall([gevent.spawn(call) for _ in range(21)], raise_error=True)
    # The first runs at once (nothing of its own was running); of the other
    # 20, the one saved token lets one more by; the 19 left come 100 a second.
    assert 0.15 <= time.monotonic() - began < 1.5


def test_one_call_at_a_time_is_never_paced():
    turns = CallTurns(slots=1, hold=5, rest=3, rate=1, burst=1)
    turns.take("client002")()
    began = time.monotonic()
    for _ in range(50):
        turns.take("client001")()
        turns.take("client002")()
    assert time.monotonic() - began < 0.5


def test_alone_a_turn_is_given_back_at_once():
    clock = FakeClock()
    turns = CallTurns(slots=1, hold=5, rest=3, clock=clock)
    for _ in range(3):
        give_back = turns.take("client001")
        clock.now += 1
        give_back()
        assert not turns._users  # free again at once: nobody else is active


def test_while_another_user_is_active_a_flooding_users_turn_rests():
    """Rests only while others are active and the user's calls queue."""
    clock = FakeClock()
    turns = CallTurns(slots=1, hold=5, rest=3, window=1, clock=clock, tick=0.001)
    turns.take("client002")()  # the quiet user was here just now
    give_back = turns.take("client001")
    clock.now += 0.02  # the call took 20 ms
    give_back()  # nothing of client001's waits: no rest
    assert not turns._users

    give_back = turns.take("client001")
    waiter = gevent.spawn(turns.take, "client001")  # its next call waits in line
    gevent.sleep(0)
    clock.now += 0.02
    give_back()
    give_back()  # given back twice (its end and a failure): counts once
    gevent.sleep(0.02)  # ticks go by, but the slot rests 3 x 20 ms of the clock's time
    assert not waiter.ready()
    clock.now += 0.061
    waiter.get(timeout=1)()

    clock.now += 2  # the quiet user has gone: no more rests
    give_back = turns.take("client001")
    waiter = gevent.spawn(turns.take, "client001")
    gevent.sleep(0)
    began = time.monotonic()
    give_back()
    waiter.get(timeout=1)()
    assert time.monotonic() - began < 0.05
