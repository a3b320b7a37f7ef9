"""The asyncio-in-gevent bridge, without NATS: prompt calls, real sockets,
cancellation on every way a caller gives up, many callers at once."""

import asyncio
import time

import gevent
import gevent.server
import pytest

from taskman.fleet.bridge import Bridge, BridgeClosed, FleetTimeout, shared


async def answer(value, delay=0.0):
    await asyncio.sleep(delay)
    return value


def test_a_call_on_an_idle_loop_returns_at_once(bridge):
    # The loop sits in select() with no timer: only the wake-up pipe written
    # by call_soon_threadsafe gets it going (loop.call_soon would wait minutes).
    gevent.sleep(0.2)
    started = time.monotonic()
    assert bridge.call(answer(42), timeout=5) == 42
    assert time.monotonic() - started < 0.5


def test_real_sockets_wait_in_the_hub_beside_greenlets(bridge):
    def echo(sock, _address):
        data = sock.recv(100)
        gevent.sleep(0.05)  # the loop must not block the hub, nor the hub the loop
        sock.sendall(data.upper())
        sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), echo)
    server.start()
    try:
        async def exchange(text):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.server_port)
            writer.write(text)
            await writer.drain()
            reply = await reader.read(100)
            writer.close()
            return reply

        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
        started = time.monotonic()
        assert bridge.call(exchange(b"hello"), timeout=5) == b"HELLO"
        assert time.monotonic() - started < 1.0
        ticker.join(2)
        assert len(ticks) == 10
    finally:
        server.stop()


def test_errors_come_back_to_the_caller(bridge):
    async def fail():
        raise KeyError("nope")

    with pytest.raises(KeyError):
        bridge.call(fail(), timeout=5)
    assert bridge.call(answer("still works"), timeout=5) == "still works"


def watched(started, cancelled):
    async def slow():
        started.append(True)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
    return slow()


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.01)


def test_the_call_timeout_cancels_the_coroutine(bridge):
    started, cancelled = [], []
    began = time.monotonic()
    with pytest.raises(FleetTimeout):
        bridge.call(watched(started, cancelled), timeout=0.2)
    assert time.monotonic() - began < 1.0
    wait_for(lambda: cancelled)


def test_the_callers_own_timeout_cancels_the_coroutine(bridge):
    started, cancelled = [], []
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.2):
            bridge.call(watched(started, cancelled))
    wait_for(lambda: cancelled)


def test_killing_the_caller_cancels_the_coroutine(bridge):
    started, cancelled = [], []
    caller = gevent.spawn(bridge.call, watched(started, cancelled))
    wait_for(lambda: started)
    caller.kill(block=True, timeout=2)
    assert caller.dead
    wait_for(lambda: cancelled)


def test_many_greenlets_call_at_once(bridge):
    count = 500
    started = time.monotonic()
    callers = [gevent.spawn(bridge.call, answer(number, delay=0.01 * (number % 5)), 10)
               for number in range(count)]
    gevent.joinall(callers, timeout=20, raise_error=True)
    assert [caller.value for caller in callers] == list(range(count))
    assert time.monotonic() - started < 5


def test_a_dead_loop_fails_its_waiters_and_later_calls(bridge):
    started, cancelled = [], []
    caller = gevent.spawn(bridge.call, watched(started, cancelled), 10)
    wait_for(lambda: started)
    bridge._greenlet.kill(block=True)  # the loop dies under a waiting caller
    caller.join(2)
    assert isinstance(caller.exception, BridgeClosed)
    with pytest.raises(BridgeClosed):
        bridge.call(answer(1))


def test_one_loop_per_process(bridge):
    assert shared() is bridge
    second = Bridge()  # asyncio's running loop is per thread, not per greenlet
    second._greenlet.join(5)
    assert "another loop is running" in str(second._greenlet.exception)
    with pytest.raises(BridgeClosed):
        second.call(answer(1))
    assert bridge.call(answer(2), timeout=5) == 2


def test_close_cancels_what_still_runs(bridge):
    started, cancelled = [], []
    caller = gevent.spawn(bridge.call, watched(started, cancelled), 10)
    wait_for(lambda: started)
    bridge.close()
    caller.join(2)
    assert cancelled
    assert isinstance(caller.exception, BridgeClosed)
    assert bridge.loop.is_closed()
