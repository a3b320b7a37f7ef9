"""Finished tasks live in the store, not in memory (#20): served from it once
their entry is dropped (or from the few that ended last), never loaded
wholesale at start, forgotten by retention through store queries. Real processes on the ``none`` driver;
histories are seeded straight into the store."""

import datetime
import itertools
import os
import types

import gevent
import pytest

from support import poll_for
from taskman import cgroups
from taskman.errors import InvalidArgument, NotFound
from taskman.manager import TaskManager
from taskman.output import log_path
from taskman.store import TaskStore
from taskman.task import JobStatus, Source, Task

HOUR = 3600.0
_batches = itertools.count()  # each seed's ids differ


def make(state_dir, **options):
    options.setdefault("retention_age", 0)
    options.setdefault("retention_bytes", 0)
    return TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=1, **options)


@pytest.fixture
def manager(state_dir):
    mgr = make(state_dir)
    yield mgr
    mgr.shutdown(timeout=10)


def dropped(mgr, task_id):
    poll_for(lambda: task_id not in mgr._tasks, message="the entry dropped")
    return mgr.status("admin", task_id)


def seed(state_dir, count, users=("alice", "bob"), ended_hours_ago=1.0, output_size=0,
         status=JobStatus.EXITED_OK):
    """``count`` finished records, 1 s apart, the newest ending ``ended_hours_ago``; their ids."""
    store = TaskStore(os.path.join(state_dir, "tasks.db"))
    newest = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=ended_hours_ago)
    ids, batch = [], next(_batches)
    store._db.execute("BEGIN")  # one transaction: thousands of records in milliseconds
    for number in range(count):
        start = newest - datetime.timedelta(seconds=count - number)
        task = Task(id=f"00000000-0000-4000-8000-{batch:04d}{number:08d}",
                    owner=users[number % len(users)], command="true", args=[], pid=100,
                    status=status, exit_code=0, start_time=start,
                    end_time=start + datetime.timedelta(milliseconds=1), output_size=output_size)
        store.save(task)
        ids.append(task.id)
    store._db.execute("COMMIT")
    store.close()
    return ids


# -- served from the store


@pytest.mark.parametrize("recent", [0, 4096], ids=["from the store", "recently ended"])
def test_a_finished_task_is_dropped_and_served_from_the_store(manager, recent, monkeypatch):
    monkeypatch.setattr("taskman.history.RECENT", recent)
    task = manager.start("alice", "sh", ["-c", "echo one; echo two >&2; exit 3"])
    done = dropped(manager, task.id)
    assert (done.status, done.exit_code, done.output_size) == (JobStatus.EXITED_ERROR, 3, 8)
    assert list(manager.entries()) == []
    assert b"".join(manager.stream("alice", task.id)) == b"one\ntwo\n"
    assert b"".join(manager.stream("alice", task.id, tail_lines=1)) == b"two\n"
    assert [listed.id for listed in manager.tasks("alice")] == [task.id]
    assert manager.tasks("alice", statuses=[JobStatus.EXITED_ERROR])[0] == done
    assert manager.stop("alice", task.id) == done  # a finished one is left as is
    for call in (manager.status, manager.stop, manager.stream):
        with pytest.raises(NotFound):
            call("mallory", task.id)
    assert manager.tasks("mallory") == []


def test_a_follower_of_a_task_that_ends_reads_to_the_end(manager):
    task = manager.start("alice", "sh", ["-c", "echo start; sleep 0.3; echo end"])
    chunks = manager.stream("alice", task.id)
    assert next(chunks) == b"start\n"
    assert b"".join(chunks) == b"end\n"
    dropped(manager, task.id)


def test_listing_merges_running_and_finished_newest_first(manager):
    finished = manager.start("alice", "true")
    dropped(manager, finished.id)
    running = manager.start("alice", "sh", ["-c", "echo live; sleep 30"])
    poll_for(lambda: manager.status("alice", running.id).output_size == 5, message="output")
    listed = manager.tasks("alice")
    assert [task.id for task in listed] == [running.id, finished.id]
    assert listed[0].output_size == 5  # the running task's live numbers, not its saved record
    assert [t.id for t in manager.tasks("alice", statuses=[JobStatus.STARTED])] == [running.id]
    manager.stop("alice", running.id)


# -- many records


def test_restart_with_many_records_loads_none_of_them(state_dir, monkeypatch):
    ids = seed(state_dir, 5000, output_size=10)
    monkeypatch.setattr(TaskStore, "load_all", lambda self: pytest.fail("loaded every record"))
    mgr = make(state_dir)
    try:
        assert len(mgr._tasks) == 0 and list(mgr.entries()) == []
        assert len(mgr.history) == 5000 and mgr.history.total_bytes == 50_000
        assert mgr.history.records == {"alice": 2500, "bob": 2500}
        assert mgr.status("alice", ids[0]).id == ids[0]
        with pytest.raises(NotFound):
            mgr.status("bob", ids[0])
        assert b"".join(mgr.stream("alice", ids[0])) == b""  # no output file: empty output
    finally:
        mgr.shutdown()


def test_pages_walk_the_store_newest_first(state_dir):
    ids = seed(state_dir, 1000)
    mgr = make(state_dir)
    try:
        newest_first = ids[::-1]
        everyone = []
        after = None
        while True:
            page = mgr.tasks("admin", limit=300, after=after)
            everyone += [task.id for task in page]
            if len(page) < 300:
                break
            after = page[-1].id
        assert everyone == newest_first
        alices = [task.id for task in mgr.tasks("alice", owner="bob", limit=5)]
        assert alices == [task_id for task_id in newest_first if int(task_id[-8:]) % 2 == 0][:5]
        assert [t.id for t in mgr.tasks("admin", owner="bob", limit=2, after=newest_first[0])] == \
            newest_first[2:5:2]
        assert mgr.tasks("admin", statuses=[JobStatus.SIGNALED, JobStatus.UNKNOWN]) == []
        mgr.store.delete([ids[500]])
        with pytest.raises(InvalidArgument, match="no longer valid"):
            mgr.tasks("admin", after=ids[500])
    finally:
        mgr.shutdown()


def test_status_filters_are_merged_newest_first(state_dir):
    ok = seed(state_dir, 10, status=JobStatus.EXITED_OK)
    signaled = seed(state_dir, 10, status=JobStatus.SIGNALED, ended_hours_ago=1.5)
    mgr = make(state_dir)
    try:
        listed = mgr.tasks("admin", statuses=[JobStatus.SIGNALED, JobStatus.EXITED_OK], limit=15)
        assert [task.id for task in listed] == (ok[::-1] + signaled[::-1])[:15]
    finally:
        mgr.shutdown()


def test_a_record_left_running_is_ended_and_counted(state_dir):
    seed(state_dir, 3)
    store = TaskStore(os.path.join(state_dir, "tasks.db"))
    store.save(Task(id="00000000-0000-4000-8000-0000000000ff", owner="alice", command="sleep",
                    args=["1"], pid=2 ** 22 + 1, start_time=datetime.datetime.now(datetime.timezone.utc)))
    store.close()
    mgr = make(state_dir)
    try:
        task = mgr.status("alice", "00000000-0000-4000-8000-0000000000ff")
        assert (task.status, task.source) == (JobStatus.UNKNOWN, Source.SERVER)
        assert len(mgr.history) == 4 and len(mgr._tasks) == 0
    finally:
        mgr.shutdown()


# -- retention from the store


def test_retention_by_age_forgets_records_and_output_from_the_store(state_dir):
    old = seed(state_dir, 30, ended_hours_ago=3)
    recent = seed(state_dir, 5, ended_hours_ago=1)
    output = log_path(os.path.join(state_dir, "output"), old[0])
    os.makedirs(os.path.dirname(output), exist_ok=True)
    open(output, "w").close()
    mgr = make(state_dir, retention_age=2 * HOUR)  # pruned as it starts
    try:
        assert len(mgr.history) == 5 and not os.path.exists(output)
        assert [task.id for task in mgr.tasks("admin")] == recent[::-1]
        with pytest.raises(NotFound):
            mgr.status("admin", old[-1])
    finally:
        mgr.shutdown()


def test_retention_by_size_forgets_the_earliest_ended(state_dir):
    ids = seed(state_dir, 10, output_size=1000)
    mgr = make(state_dir, retention_bytes=4500)
    try:
        assert [task.id for task in mgr.tasks("admin")] == ids[:5:-1]
        assert mgr.history.total_bytes == 4000
        task = mgr.start("alice", "head", ["-c", "1000", "/dev/zero"])  # checked as it ends
        dropped(mgr, task.id)
        poll_for(lambda: mgr.history.total_bytes == 4000, message="the budget kept")
        assert [t.id for t in mgr.tasks("admin")] == [task.id] + ids[:6:-1]
    finally:
        mgr.shutdown()


def test_retention_in_batches_forgets_everything_due(state_dir, monkeypatch):
    monkeypatch.setattr("taskman.history.PRUNE_BATCH", 7)
    seed(state_dir, 50, ended_hours_ago=3)
    mgr = make(state_dir, retention_age=HOUR)
    try:
        assert len(mgr.history) == 0 and mgr.tasks("admin") == []
    finally:
        mgr.shutdown()


def test_each_users_records_past_their_quota_are_forgotten_from_the_store(state_dir):
    ids = seed(state_dir, 20)  # alice has the even ones, bob the odd
    quotas = types.SimpleNamespace(limits=types.SimpleNamespace(output_bytes=0),
                                   records_to_forget=lambda user, kept: max(0, kept - 3),
                                   check_start=lambda *args: None)
    mgr = make(state_dir, quotas=quotas)
    try:
        assert [task.id for task in mgr.tasks("alice")] == [ids[18], ids[16], ids[14]]
        assert [task.id for task in mgr.tasks("bob")] == [ids[19], ids[17], ids[15]]
        assert mgr.history.records == {"alice": 3, "bob": 3}
    finally:
        mgr.shutdown()


def test_a_log_being_read_is_spared_until_the_reader_lets_go(manager):
    task = manager.start("alice", "echo", ["hello"])
    dropped(manager, task.id)
    chunks = manager.chunks("alice", task.id)
    manager.retention_age = 1e-6
    gevent.sleep(0.01)
    assert manager.prune() == 0
    assert b"".join(chunk.data for chunk in chunks) == b"hello\n"
    assert manager.prune() == 1
    with pytest.raises(NotFound):
        manager.status("alice", task.id)
