"""Helpers for tests: bounded polling (every wait in a test ends)."""

import time

import gevent


def poll_for(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Return predicate()'s first truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        gevent.sleep(interval)
