"""Per-user quotas: how much of the server one user may hold at once, so one
user cannot starve the others (RESOURCE_EXHAUSTED instead).

One place the manager and servicer ask: ``check_start`` before a task is
made, ``acquire_stream``/``acquire_call`` around an output stream or any
call, ``records_to_forget`` from retention, ``usage`` for GetUsage. Streams
and calls in flight are counted here; what the manager already knows (running
tasks, finished records, output bytes on disk) it reports through the
``measure`` callable, so there is one count of each thing, not two.

Every quota applies to each user separately, is a server option
(``--quota-<name>``) and means "no limit" when 0. Defaults are generous for
one person's normal work; tests and benchmarks that need more raise them.
"""

import contextlib
import dataclasses
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple

from taskman.errors import InvalidArgument, ResourceExhausted

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class QuotaLimits:
    """Each user's quotas; 0 means no limit."""

    running_tasks: int = 100
    open_streams: int = 32
    calls_in_flight: int = 64
    # Command and arguments together, like the kernel's ARG_MAX (2 MiB here)
    # but smaller: every byte is kept in memory and in the store.
    argument_bytes: int = 256 * 1024
    finished_records: int = 1000
    output_bytes: int = 4 * GiB  # on disk, running tasks included

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"{option(field.name)} must be 0 (no limit) or more, "
                                      f"not {value!r}")


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the manager knows of one user's holdings."""

    running_tasks: int = 0
    finished_records: int = 0
    output_bytes: int = 0
    largest_arguments: int = 0  # of the user's running tasks


class Usage(NamedTuple):
    """One line of ``usage``: the quota's name, the user's use, the limit
    (0: none), the option that sets it."""

    name: str
    used: int
    limit: int
    option: str


# field -> (the name users read, what to do about it)
_WORDS = {
    "running_tasks": ("running tasks", "stop or wait for some to end"),
    "open_streams": ("open streams", "close one of your other streams first"),
    "calls_in_flight": ("calls in flight", "wait for your other calls to return"),
    "argument_bytes": ("argument bytes per task", "pass large input in a file instead"),
    "finished_records": ("finished records kept", "the oldest are forgotten first"),
    "output_bytes": ("output bytes on disk", "wait for old output to expire"),
}


def option(field: str) -> str:
    """The server option that sets quota ``field``."""
    return "--quota-" + field.replace("_", "-")


def exceeded(field: str, used: int, limit: int, user: str) -> ResourceExhausted:
    """The one sentence a refusal carries: quota, value, the user's usage, the way out."""
    name, advice = _WORDS[field]
    return ResourceExhausted(f"quota exceeded: {name} {used} of {limit} for {user}; "
                             f"{advice} ({option(field)})")


class Quotas:
    """Counts and checks each user's quotas; safe to call from any thread
    or greenlet."""

    def __init__(self, limits: QuotaLimits = QuotaLimits(),
                 measure: Callable[[str], Measured] = lambda user: Measured()):
        self.limits = limits
        self._measure = measure
        self._lock = threading.Lock()
        self._streams: Dict[str, int] = {}
        self._calls: Dict[str, int] = {}

    def check_start(self, user: str, argument_bytes: int) -> None:
        """Raise ResourceExhausted if ``user`` may not start a task whose
        command and arguments take ``argument_bytes``: the arguments are too
        big, or the user already runs too many tasks or holds too much output.
        """
        limits = self.limits
        if limits.argument_bytes and argument_bytes > limits.argument_bytes:
            raise exceeded("argument_bytes", argument_bytes, limits.argument_bytes, user)
        measured = self._measure(user)
        if limits.running_tasks and measured.running_tasks >= limits.running_tasks:
            raise exceeded("running_tasks", measured.running_tasks, limits.running_tasks, user)
        if limits.output_bytes and measured.output_bytes >= limits.output_bytes:
            raise exceeded("output_bytes", measured.output_bytes, limits.output_bytes, user)

    def output_exceeded(self, user: str, output_bytes: int) -> bool:
        """True once ``user``'s output on disk reaches the quota: the output
        writer stops keeping more of a running task's output."""
        return bool(self.limits.output_bytes) and output_bytes >= self.limits.output_bytes

    def records_to_forget(self, user: str, finished_records: int) -> int:
        """How many of ``user``'s oldest finished records retention should drop now."""
        limit = self.limits.finished_records
        return max(0, finished_records - limit) if limit else 0

    @contextlib.contextmanager
    def acquire_stream(self, user: str) -> Iterator[None]:
        """Hold one of ``user``'s output streams for the ``with`` block;
        ResourceExhausted if all are taken."""
        with self._holding(self._streams, "open_streams", user):
            yield

    @contextlib.contextmanager
    def acquire_call(self, user: str) -> Iterator[None]:
        """Hold one of ``user``'s calls in flight for the ``with`` block;
        ResourceExhausted if all are taken."""
        with self._holding(self._calls, "calls_in_flight", user):
            yield

    @contextlib.contextmanager
    def _holding(self, counts: Dict[str, int], field: str, user: str) -> Iterator[None]:
        limit = getattr(self.limits, field)
        with self._lock:
            held = counts.get(user, 0)
            if limit and held >= limit:
                raise exceeded(field, held, limit, user)
            counts[user] = held + 1
        try:
            yield
        finally:
            with self._lock:
                counts[user] -= 1
                if not counts[user]:
                    del counts[user]  # users come and go: keep no empty entries

    def usage(self, user: str) -> List[Usage]:
        """``user``'s use of every quota, in a fixed order."""
        measured = self._measure(user)
        with self._lock:
            streams, calls = self._streams.get(user, 0), self._calls.get(user, 0)
        used = {"running_tasks": measured.running_tasks, "open_streams": streams,
                "calls_in_flight": calls, "argument_bytes": measured.largest_arguments,
                "finished_records": measured.finished_records,
                "output_bytes": measured.output_bytes}
        return [Usage(_WORDS[field][0], used[field], getattr(self.limits, field), option(field))
                for field in _WORDS]
