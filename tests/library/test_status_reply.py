"""GetTaskStatus's reply of a finished task is made once, and never stale."""

import dataclasses
import datetime

from taskman.responses import status_reply, status_response
from taskman.task import JobStatus, Task

WHEN = datetime.datetime(2026, 12, 2, 22, 0, tzinfo=datetime.timezone.utc)


def _finished(task_id: str, **fields) -> Task:
    task = Task(id=task_id, owner="client001", command="/bin/true", args=["-x"], pid=7,
                status=JobStatus.EXITED_OK, exit_code=0, start_time=WHEN, end_time=WHEN,
                output_size=12)
    return dataclasses.replace(task, **fields)


def test_a_finished_tasks_reply_is_reused_while_its_record_is_the_same():
    task_id = "5a0c2f7e-8a50-4d47-9d5e-0c3d7f1a2b01"
    first = status_reply(_finished(task_id))
    assert first == status_response(_finished(task_id))
    assert status_reply(_finished(task_id)) is first  # a fresh snapshot, equal
    # Any field that differs (output noted after the end, say): a new reply.
    changed = status_reply(_finished(task_id, output_dropped=5, output_note="disk full"))
    assert changed is not first and changed.output_dropped_bytes == 5
    assert changed.output_note == "disk full"


def test_running_tasks_and_long_replies_are_made_each_time():
    running = Task(id="5a0c2f7e-8a50-4d47-9d5e-0c3d7f1a2b02", owner="u", command="sleep",
                   args=["9"], pid=8, start_time=WHEN)
    assert status_reply(running) is not status_reply(dataclasses.replace(running))
    long = _finished("5a0c2f7e-8a50-4d47-9d5e-0c3d7f1a2b03", args=["a" * 10_000])
    reply = status_reply(long)
    assert reply.args == ["a" * 10_000]
    assert status_reply(dataclasses.replace(long, args=list(long.args))) is not reply
