"""taskman.store: a record saved again is updated in place, or replaced."""

import os

from taskman.store import TaskStore
from taskman.task import JobStatus, Task, now


def _rowid(store, task_id):
    return store._db.execute("SELECT rowid FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]


def test_a_tasks_end_updates_its_record_in_place(tmp_path):
    # A REPLACE deleted and reinserted the row (a new rowid) in every index.
    store = TaskStore(os.path.join(tmp_path, "tasks.db"))
    task = Task(id="6f1c1b9e-1d2a-4c3b-8e4f-5a6b7c8d9e0f", owner="alice", command="/bin/true",
                args=["a b", "c"], pid=42, start_time=now())
    store.save_started(task, 1000, "boot/1")
    before = _rowid(store, task.id)
    ended = task.snapshot()
    ended.status, ended.exit_code, ended.end_time = JobStatus.EXITED_OK, 0, now()
    ended.output_size, ended.output_note = 12, "note"
    store.save(ended)
    assert _rowid(store, task.id) == before
    assert store.load(task.id) == ended
    assert store.load_running() == []


def test_a_record_saved_with_another_identity_is_replaced(tmp_path):
    store = TaskStore(os.path.join(tmp_path, "tasks.db"))
    task = Task(id="6f1c1b9e-1d2a-4c3b-8e4f-5a6b7c8d9e0f", owner="alice", command="/bin/true",
                args=[], pid=42, start_time=now())
    store.save(task)
    other = task.snapshot()
    other.owner, other.args = "bob", ["x"]
    store.save(other)
    assert store.load(task.id) == other and len(store.load_all()) == 1
