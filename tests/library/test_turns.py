"""Turns at sending stream output (taskman/turns.py): a few at a time, handed
round-robin by user, never held past ``hold``, given back when a waiter dies."""

import gevent
import pytest

from taskman.turns import SendTurns

pytestmark = pytest.mark.timeout(10)


def test_a_lone_stream_never_waits():
    turns = SendTurns(slots=1, hold=5)
    for _ in range(100):
        with turns.turn("client001"):
            pass
    assert turns.free == 1 and turns.waiting() == 0


def test_at_most_slots_turns_are_out_at_once():
    turns = SendTurns(slots=2, hold=5)
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
    turns = SendTurns(slots=1, hold=5)
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
    turns = SendTurns(slots=1, hold=0.05)
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


def test_a_waiter_killed_in_line_leaves_no_turn_behind():
    turns = SendTurns(slots=1, hold=5)
    with turns.turn("client001"):
        waiter = gevent.spawn(lambda: turns.turn("client002").__enter__())
        gevent.sleep(0)
        assert turns.waiting() == 1
        waiter.kill()
        assert turns.waiting() == 0
    assert turns.free == 1
