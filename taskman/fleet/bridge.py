"""One asyncio event loop inside the gevent hub, for the asyncio NATS client.

nats-py is asyncio-only; the server is gevent. The loop runs in a greenlet
(``run_forever``) on a selector that waits in the hub when the loop sleeps
(``_Selector``), so its sockets wait beside everyone else's; a greenlet
hands it a coroutine with ``call_soon_threadsafe``
(the only call that writes the loop's wake-up pipe) and waits on an
AsyncResult. ``docs/fleet.md`` records the shortcuts that hang instead:
``loop.call_soon`` or ``ensure_future`` from a greenlet do not wake the
selector, so the call waits for the loop's next timer (minutes); and there is
one loop per process, since asyncio keeps the running loop per thread.
"""

import asyncio
import logging
import socket
import time
from typing import Any, Awaitable, Optional

import gevent
import gevent.event
import gevent.monkey
import gevent.socket

from taskman.errors import Unavailable

log = logging.getLogger("taskman.fleet.bridge")


class BridgeClosed(Unavailable):
    """The bridge's loop is gone (closed, or it died): no call can run."""


class FleetTimeout(Unavailable):
    """The fleet did not answer within the call's timeout (the call was cancelled)."""


class _Call:
    """One coroutine handed to the loop, and how its caller hears back."""

    def __init__(self, coroutine: Awaitable):
        self.coroutine = coroutine
        self.result = gevent.event.AsyncResult()
        self.task: Optional[asyncio.Task] = None
        self.abandoned = False  # the caller gave up before the loop took it

    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs on the loop: wrap the coroutine in a task, report its end."""
        if self.abandoned:
            self.coroutine.close()  # never started: no "never awaited" warning
            return
        self.task = loop.create_task(self.coroutine)
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self.result.set_exception(BridgeClosed("the call was cancelled on the fleet's loop"))
        elif task.exception() is not None:
            self.result.set_exception(task.exception())
        else:
            self.result.set(task.result())

    def abandon(self) -> None:
        """Runs on the loop: the caller is gone; cancel the coroutine."""
        self.abandoned = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


# The loop yields to the hub at least this often while it has work queued,
# so a busy loop (many followers) cannot starve the greenlets.
YIELD_EVERY = 0.002
_Epoll = gevent.monkey.get_original("selectors", "EpollSelector")  # a real epoll
_WAITED = socket.timeout("the loop's wait ended")


class _Selector(_Epoll):
    """The loop's selector: a real epoll, asked without blocking; when
    nothing is ready and the loop may sleep, its greenlet waits in the hub
    for the epoll's own descriptor (readable when any registered one is).

    gevent's own selector switches to the hub on every pass of the loop and
    starts a watcher per descriptor each time: a NATS round trip between two
    connections of one process took 1.3 ms on it, 0.6 ms on plain asyncio
    (docs/fleet.md). This one switches only to sleep, or every YIELD_EVERY
    of continuous work.
    """

    def __init__(self) -> None:
        super().__init__()
        self._yielded = time.monotonic()

    def select(self, timeout: Optional[float] = None) -> list:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            if time.monotonic() - self._yielded > YIELD_EVERY:
                gevent.sleep(0)  # let the greenlets run; the events stay pending
                self._yielded = time.monotonic()
            return ready
        try:
            gevent.socket.wait_read(self.fileno(), timeout=timeout, timeout_exc=_WAITED)
        except socket.timeout as error:
            if error is not _WAITED:
                raise
        self._yielded = time.monotonic()
        return super().select(0)


_shared: Optional["Bridge"] = None


def shared() -> "Bridge":
    """The process's bridge, made on first use (or after the last one died).

    asyncio keeps the running loop per OS thread, and greenlets share the
    thread: a second loop started while one runs fails with "Cannot run the
    event loop while another loop is running". So a process has one.
    """
    global _shared
    if _shared is None or not _shared.alive:
        _shared = Bridge()
    return _shared


class Bridge:
    """The process's asyncio loop, run by a supervised greenlet (get it
    with ``shared()``: one per process).

    ``call(coroutine, timeout)`` runs a coroutine on the loop and returns its
    result to the calling greenlet, raising what it raised. A gevent.Timeout
    or GreenletExit in the caller (its own deadline, ``timeout``, a kill)
    cancels the coroutine on the loop, so nothing is left running for a
    caller that is gone. If the loop dies, waiting callers get BridgeClosed.
    """

    def __init__(self) -> None:
        self.loop = asyncio.SelectorEventLoop(_Selector())
        self._pending: set = set()
        self._closed = False
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link(self._ended)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _ended(self, greenlet: gevent.Greenlet) -> None:
        """The loop greenlet returned or died: fail everyone still waiting."""
        if not self._closed:
            log.error("the NATS bridge's event loop stopped: %r", greenlet.exception)
        self._closed = True
        for call in list(self._pending):
            call.result.set_exception(BridgeClosed("the fleet connection's event loop stopped"))

    @property
    def alive(self) -> bool:
        return not self._closed and not self._greenlet.dead

    def call(self, coroutine: Awaitable, timeout: Optional[float] = None) -> Any:
        """Run ``coroutine`` on the loop; return its result or raise its error.

        Raises FleetTimeout after ``timeout`` seconds, BridgeClosed if the
        loop is gone. Whatever ends the wait early (the caller's own
        gevent.Timeout, GreenletExit) propagates; in every case the
        coroutine is cancelled on the loop.
        """
        if not self.alive:
            coroutine.close()
            raise BridgeClosed("the fleet connection is closed")
        call = _Call(coroutine)
        self._pending.add(call)
        try:
            self.loop.call_soon_threadsafe(call.begin, self.loop)
            call.result.wait(timeout)
            if not call.result.ready():
                raise FleetTimeout(f"the fleet did not answer within {timeout:g} s")
            return call.result.get()
        except BaseException:
            if not call.result.ready() and self.alive:
                self.loop.call_soon_threadsafe(call.abandon)
            raise
        finally:
            self._pending.discard(call)

    def post(self, coroutine: Awaitable) -> None:
        """Run ``coroutine`` on the loop without waiting for it (work that
        follows an answer already given); its failure is logged."""
        if not self.alive:
            coroutine.close()
            raise BridgeClosed("the fleet connection is closed")

        def begin() -> None:
            self.loop.create_task(coroutine).add_done_callback(_log_failure)

        self.loop.call_soon_threadsafe(begin)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and close it."""
        if self._closed:
            return
        self._closed = True

        async def cancel_all() -> None:
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            done = gevent.event.AsyncResult()
            self.loop.call_soon_threadsafe(
                lambda: self.loop.create_task(cancel_all()).add_done_callback(
                    lambda _task: done.set()))
            done.wait(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._greenlet.join(timeout)
        finally:
            if self._greenlet.dead:
                self.loop.close()
            else:
                self._greenlet.kill(block=False)


def _log_failure(task: "asyncio.Task") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("fleet work posted to the loop failed: %r", task.exception())
