"""Task groups made ahead of demand (taskman.task_groups) on the host's real
cgroups: a start takes a ready group that already has its limits and is in
its user's slice, the pool is refilled, an idle user's ready groups and
slice go, shutdown leaves nothing, and a server that died with ready groups
has them removed by the next one's start-up clean-up.

Needs root and cgroups; skips with the reason otherwise.
"""

import os

import gevent
import pytest

from support import driver_for_tests, poll_for
from taskman import task_groups
from taskman.cgroups import cgroupfs
from taskman.cgroups.slices import Owner
from taskman.errors import ResourceExhausted, Unavailable
from taskman.holdings import Holdings
from taskman.manager import TaskManager
from taskman.quotas import QuotaLimits, Quotas
from taskman.task import JobStatus

pytestmark = pytest.mark.timeout(60)

SLICE = "user-name-alice"


def slice_groups(driver):
    """Task groups in alice's slice, per hierarchy (one list each)."""
    return [sorted(cgroupfs.subgroups(os.path.join(hierarchy.base, SLICE)))
            for hierarchy in driver.hierarchies]


def ready(manager):
    """The ids of alice's ready groups, oldest first."""
    return [group.task_id for group in manager.groups._ready.get(Owner("alice"), ())]


@pytest.fixture
def make(tmp_path):
    made = []

    def make_manager(warm=2, suffix="-warm"):
        driver = driver_for_tests("cgroup", suffix)
        manager = TaskManager(str(tmp_path / f"state{len(made)}"), driver=driver, stop_grace=1,
                              warm_groups=warm)
        made.append(manager)
        return manager

    yield make_manager
    for manager in made:
        manager.shutdown(timeout=10)
    for manager in made:
        assert not [hierarchy.base for hierarchy in manager.driver.hierarchies
                    if os.path.exists(hierarchy.base)], "groups left after shutdown"


def wait_ended(manager, task_id):
    poll_for(lambda: not manager.status("alice", task_id).running, message=f"task {task_id} to end")


def test_a_start_takes_a_ready_group_with_its_limits_and_the_pool_refills(make):
    manager = make(warm=2)
    first = manager.start("alice", "true")  # no ready group yet: made for it
    poll_for(lambda: len(ready(manager)) == 2, message="two ready groups")
    waiting = ready(manager)
    for hierarchy in manager.driver.hierarchies:
        directory = os.path.join(hierarchy.base, SLICE, waiting[0])
        for setting in hierarchy.settings:
            path = os.path.join(directory, setting.file)
            if setting.required or os.path.exists(path):
                assert cgroupfs.read(path).strip().endswith(setting.value.split()[-1]), path
        assert cgroupfs.read(os.path.join(directory, "cgroup.procs")).strip() == ""
    second = manager.start("alice", "sleep", ["30"])
    assert second.id == waiting[0]  # the ready group's id is the task's
    # The gate joins its groups itself, after the start returns and before
    # its command runs (taskman-gate -c): in every hierarchy, and nothing else.
    directories = [os.path.join(h.base, SLICE, second.id) for h in manager.driver.hierarchies]
    poll_for(lambda: all(cgroupfs.pids([directory]) == {second.pid} for directory in directories),
             message="the task's gate in each of its ready groups")
    poll_for(lambda: len(ready(manager)) == 2 and second.id not in ready(manager),
             message="the pool refilled")
    manager.stop("alice", second.id)
    wait_ended(manager, first.id)
    wait_ended(manager, second.id)
    poll_for(lambda: all(groups == sorted(ready(manager)) for groups in slice_groups(manager.driver)),
             message="only the ready groups left in the slice")


def test_an_idle_users_ready_groups_and_slice_go(make, monkeypatch):
    monkeypatch.setattr(task_groups, "IDLE_SECONDS", 0.2)
    manager = make(warm=2)
    task = manager.start("alice", "true")
    wait_ended(manager, task.id)
    poll_for(lambda: not any(os.path.exists(os.path.join(h.base, SLICE))
                             for h in manager.driver.hierarchies),
             message="the idle user's slice to go")
    assert ready(manager) == []


def test_ready_groups_of_a_server_that_died_are_removed_by_the_next(make):
    manager = make(warm=2)
    manager.start("alice", "true")
    poll_for(lambda: len(ready(manager)) == 2, message="two ready groups")
    left = ready(manager)
    # Died: nothing of its own clean-up runs, and its lock on the roots goes.
    manager.groups._ready.clear()
    manager.groups._sweeper.kill()
    manager.driver._unlock()
    gevent.sleep(0.01)  # gevent's os.close closes on the loop's next turn
    assert all(set(left) <= set(groups) for groups in slice_groups(manager.driver))
    successor = make(warm=0)
    assert successor.driver.hierarchies[0].base == manager.driver.hierarchies[0].base
    assert not any(os.path.exists(os.path.join(h.base, SLICE, task_id))
                   for h in successor.driver.hierarchies for task_id in left)


def test_without_a_pool_no_group_waits(make):
    manager = make(warm=0)
    task = manager.start("alice", "true")
    wait_ended(manager, task.id)
    poll_for(lambda: not any(os.path.exists(os.path.join(h.base, SLICE))
                             for h in manager.driver.hierarchies), message="the slice to go")


def test_concurrent_starts_keep_the_running_quota_and_stop_with_the_server(tmp_path):
    """A start yields while its group is made or its pid placed (in the
    worker threads): the running-tasks quota and a shutdown are checked
    again before the gate opens."""
    holdings = Holdings()
    quotas = Quotas(QuotaLimits(running_tasks=1), holdings.measure)
    manager = TaskManager(str(tmp_path / "state"), driver=driver_for_tests("cgroup", "-quota"),
                          stop_grace=1, quotas=quotas, warm_groups=0)
    holdings.attach(manager, "admin")
    try:
        starts = [gevent.spawn(manager.start, "alice", "sleep", ["30"]) for _ in range(5)]
        gevent.joinall(starts)
        assert sum(start.successful() for start in starts) == 1
        assert all(isinstance(start.exception, ResourceExhausted) for start in starts
                   if not start.successful())
        late = gevent.spawn(manager.start, "bob", "sleep", ["30"])
        gevent.sleep(0)  # under way: its group is being made in the worker
        manager.shutdown(timeout=5)
        with pytest.raises(Unavailable):
            late.get()
        assert len(manager.tasks("admin", statuses=[JobStatus.STARTED])) == 0
    finally:
        manager.shutdown(timeout=5)
