"""Holdings (taskman/holdings.py): each user's running tasks kept from the
manager's events stay exactly what a walk of every task would count, across
starts, exits, stops and a reload's adopted tasks."""

import gevent
import pytest

from support import poll_for
from taskman import cgroups
from taskman.holdings import Holdings, argument_bytes
from taskman.manager import TaskManager
from taskman.quotas import Measured, QuotaLimits, Quotas

pytestmark = pytest.mark.timeout(120)


def walked(manager, user) -> Measured:
    """What a walk of every task counts (how Holdings measured before)."""
    running = output = largest = 0
    for entry in list(manager.entries()):
        if entry.task.owner != user:
            continue
        output += entry.log.size
        if entry.task.running:
            running += 1
            largest = max(largest, argument_bytes(entry.task.command, entry.task.args))
    history = manager.history
    return Measured(running, history.records.get(user, 0),
                    output + history.bytes.get(user, 0), largest)


@pytest.fixture
def manager(state_dir):
    holdings = Holdings()
    made = TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=1.0,
                       quotas=Quotas(QuotaLimits(), holdings.measure))
    holdings.attach(made, "admin")
    made.holdings = holdings
    yield made
    made.shutdown(timeout=15)


def ended(manager, task):
    poll_for(lambda: not manager.status(task.owner, task.id).running, message="the end")


def exact(manager):
    for user in ("alice", "bob", "carol"):
        assert manager.holdings.measure(user) == walked(manager, user), user
    assert manager.holdings.users() == sorted(
        {entry.task.owner for entry in manager.entries()} | set(manager.history.records))


def test_running_totals_stay_exact_across_starts_exits_and_stops(manager):
    exact(manager)
    sleepers = [manager.start(user, "sleep", ["30"]) for user in ("alice", "bob", "alice")]
    quick = [manager.start(user, "sh", ["-c", "echo out; echo err >&2"])
             for user in ("alice", "bob", "carol")]
    manager.start("alice", "echo", ["x" * 1000])
    exact(manager)
    assert manager.holdings.measure("alice").running_tasks >= 2
    for task in quick:
        ended(manager, task)
    gevent.sleep(0.1)  # the output pumped
    exact(manager)
    manager.stop("alice", sleepers[0].id)
    exact(manager)
    assert manager.holdings.measure("alice").running_tasks == 1
    # Starts together, ending in any order while others start.
    burst = [manager.start("bob", "sh", ["-c", "echo $$"]) for _ in range(10)]
    for task in burst:
        ended(manager, task)
    exact(manager)
    for task in sleepers[1:]:
        manager.stop(task.owner, task.id)
    exact(manager)
    assert manager.holdings.measure("alice").running_tasks == 0
    assert manager.holdings._running == {}  # nobody runs anything: nothing kept


class Adopting:
    """A manager as a reload's new image has it: tasks already running when
    Holdings is attached (adopted), then events."""

    def __init__(self, manager):
        self.inner = manager
        self.listeners = []
        self.history = manager.history

    def entries(self):
        return self.inner.entries()


def test_a_reloads_adopted_tasks_are_counted_when_attached(manager):
    running = [manager.start(user, "sleep", ["30"]) for user in ("alice", "alice", "bob")]
    adopted = Holdings()
    adopting = Adopting(manager)
    adopted.attach(adopting, "admin")
    for user in ("alice", "bob", "carol"):
        assert adopted.measure(user) == walked(manager, user)
    assert adopted.measure("alice").running_tasks == 2
    manager.stop("alice", running[0].id)
    for listener in adopting.listeners:  # the new image's manager tells its listeners
        listener("ended", manager.status("alice", running[0].id))
    assert adopted.measure("alice") == walked(manager, "alice")
    assert adopted.measure("alice").running_tasks == 1
