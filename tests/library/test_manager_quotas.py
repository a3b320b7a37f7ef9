"""TaskManager with per-user quotas (#16): starts refused, finished records
forgotten per user, running output capped, each user's tasks in their slice.
Real processes on the ``none`` driver (the slices on real cgroups are
tests/library/test_slices.py's and the integration tests')."""

import gevent
import pytest

from support import poll_for
from taskman import cgroups, output_quota
from taskman.errors import ResourceExhausted
from taskman.holdings import Holdings
from taskman.manager import TaskManager
from taskman.quotas import QuotaLimits, Quotas


@pytest.fixture
def make(state_dir):
    made = []

    def make_manager(**limits):
        holdings = Holdings()
        quotas = Quotas(QuotaLimits(**limits), holdings.measure)
        manager = TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=1.0,
                              quotas=quotas)
        holdings.attach(manager, "admin")
        made.append(manager)
        return manager
    yield make_manager
    for manager in made:
        manager.shutdown(timeout=15)


def ended(manager, owner, task_id):
    return poll_for(lambda: not manager.status(owner, task_id).running, message="the end")


def test_starts_past_the_running_and_argument_quotas_are_refused(make):
    manager = make(running_tasks=1, argument_bytes=100)
    running = manager.start("alice", "sleep", ["30"])
    with pytest.raises(ResourceExhausted, match=r"^quota exceeded: running tasks 1 of 1 for alice"):
        manager.start("alice", "sleep", ["30"])
    manager.start("bob", "sleep", ["30"])  # another user's own quota
    # "true" + 4 arguments of 24 bytes, each with its NUL: 4 + 100 = 104 bytes.
    with pytest.raises(ResourceExhausted, match=r"argument bytes per task 104 of 100 for bob"):
        manager.start("bob", "true", ["x" * 24] * 4)
    assert len(manager.tasks("admin")) == 2  # nothing was made for a refused start
    manager.stop("alice", running.id)


def test_each_users_oldest_finished_records_past_the_quota_are_forgotten(make):
    manager = make(finished_records=2)
    alice = []
    for _ in range(4):  # one after another: started together, they may end in any order
        alice.append(manager.start("alice", "true"))
        ended(manager, "alice", alice[-1].id)
        gevent.sleep(0.01)  # distinct end times
    bob = manager.start("bob", "true")
    ended(manager, "bob", bob.id)
    assert manager.prune() == 2
    assert {task.id for task in manager.tasks("alice")} == {task.id for task in alice[2:]}
    assert [task.id for task in manager.tasks("bob")] == [bob.id]


def test_running_output_past_the_users_quota_is_capped(make):
    manager = make(output_bytes=10_000)
    script = "head -c 20000 /dev/zero; echo; echo written; sleep 0.5; head -c 5000 /dev/zero; sleep 30"
    task = manager.start("alice", "sh", ["-c", script])
    poll_for(lambda: manager.status("alice", task.id).output_size >= 20_009, message="output")
    assert output_quota.sweep(manager._tasks.values(), manager.quotas) == 1
    capped_at = manager.status("alice", task.id).output_size
    poll_for(lambda: manager.status("alice", task.id).output_dropped >= 5000, message="drops")
    status = manager.status("alice", task.id)
    assert status.output_size == capped_at and "cap" in status.output_note
    output = b"".join(manager.stream("alice", task.id, follow=False))
    assert output.endswith(b"written\n\n[taskman: output cap of 20009 bytes reached; "
                           b"the rest is dropped]\n")
    with pytest.raises(ResourceExhausted, match="output bytes on disk"):
        manager.start("alice", "true")
    assert output_quota.sweep(manager._tasks.values(), manager.quotas) == 0  # already capped
    manager.stop("alice", task.id)


def test_unconfined_users_each_get_a_named_slice(make, monkeypatch):
    manager = make()
    owners = []
    create = manager.driver.create
    monkeypatch.setattr(manager.driver, "create",
                        lambda task_id, owner=None: owners.append(owner) or create(task_id, owner))
    for user in ("alice", "bob"):
        ended(manager, user, manager.start(user, "true").id)
    assert [owner.slice_name for owner in owners] == ["user-name-alice", "user-name-bob"]
