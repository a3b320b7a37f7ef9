"""Records survive restarts and crashes; listing; retention by age and size."""

import os
import signal
import subprocess
import sys
import textwrap

import gevent
import pytest

from support import poll_for, process_running
from taskman import cgroups
from taskman.errors import NotFound
from taskman.manager import TaskManager
from taskman.task import JobStatus, Source


def make(state_dir, **options):
    return TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=1, **options)


def finished(mgr, task_id, owner="alice"):
    return poll_for(lambda: (lambda t: t if not t.running else None)(mgr.status(owner, task_id)),
                    message="task to end")


def test_clean_restart_keeps_status_output_and_owners(state_dir):
    first = make(state_dir)
    ok = first.start("alice", "sh", ["-c", "printf 'a\\0b'; exit 0"])
    bad = first.start("bob", "sh", ["-c", "echo no >&2; exit 7"])
    running = first.start("alice", "sleep", ["300"])
    before = {t: finished(first, t, owner) for t, owner in ((ok.id, "alice"), (bad.id, "bob"))}
    first.shutdown()
    second = make(state_dir)
    try:
        for task_id, owner in ((ok.id, "alice"), (bad.id, "bob")):
            assert second.status(owner, task_id) == before[task_id]
        assert b"".join(second.stream("alice", ok.id)) == b"a\0b"
        assert b"".join(second.stream("admin", bad.id)) == b"no\n"
        with pytest.raises(NotFound):
            second.status("alice", bad.id)
        stopped = second.status("alice", running.id)
        assert (stopped.status, stopped.source) == (JobStatus.SIGNALED, Source.SERVER)
    finally:
        second.shutdown()


CRASHING_SERVER = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import sys, gevent, gevent.event
    from taskman import cgroups
    from taskman.manager import TaskManager
    mgr = TaskManager(sys.argv[1], driver=cgroups.select_driver("none"))
    ended = gevent.event.Event()  # "ended" is announced after the record is saved
    mgr.listeners.append(lambda event, task: event == "ended" and ended.set())
    done = mgr.start("alice", "echo", ["finished before the crash"])
    if not ended.wait(10):
        sys.exit("the first task did not end within 10 s")
    running = mgr.start("alice", "sh", ["-c", "echo started; exec sleep 300"])
    gone = mgr.start("alice", "sh", ["-c", "exec sleep 300"])
    next(mgr.stream("alice", running.id))  # "started" is on disk, not just in the pipe
    print(done.id, running.id, running.pid, gone.id, gone.pid, flush=True)
    gevent.sleep(300)
""")


def test_crash_restart_ends_what_was_running(state_dir):
    server = subprocess.Popen([sys.executable, "-c", CRASHING_SERVER, state_dir],
                              stdout=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(20):
            done_id, running_id, running_pid, gone_id, gone_pid = server.stdout.readline().split()
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        os.kill(int(gone_pid), signal.SIGKILL)  # died while nobody watched
        poll_for(lambda: not process_running(int(gone_pid)), message="the unwatched task to die")
        mgr = make(state_dir)
    finally:
        server.kill()
    try:
        assert mgr.status("alice", done_id).status == JobStatus.EXITED_OK
        assert b"".join(mgr.stream("alice", done_id)) == b"finished before the crash\n"
        killed = mgr.status("alice", running_id)
        assert (killed.status, killed.signal, killed.source) == \
            (JobStatus.SIGNALED, "SIGKILL", Source.SERVER)
        assert killed.end_time is not None
        assert b"".join(mgr.stream("alice", running_id)) == b"started\n"
        poll_for(lambda: not process_running(int(running_pid)),
                 message="the orphaned task process to die")
        lost = mgr.status("alice", gone_id)
        assert (lost.status, lost.exit_code, lost.source) == (JobStatus.UNKNOWN, None, Source.SERVER)
    finally:
        mgr.shutdown()


def test_listing_is_per_user_newest_first_and_filtered(state_dir):
    mgr = make(state_dir)
    try:
        a1 = mgr.start("alice", "true")
        b1 = mgr.start("bob", "false")
        a2 = mgr.start("alice", "sleep", ["300"])
        finished(mgr, a1.id)
        finished(mgr, b1.id, "bob")
        assert [t.id for t in mgr.tasks("alice")] == [a2.id, a1.id]
        assert [t.id for t in mgr.tasks("alice", owner="bob")] == [a2.id, a1.id]
        assert [t.id for t in mgr.tasks("bob")] == [b1.id]
        assert [t.id for t in mgr.tasks("admin")] == [a2.id, b1.id, a1.id]
        assert [t.id for t in mgr.tasks("admin", owner="bob")] == [b1.id]
        assert [t.id for t in mgr.tasks("admin", statuses=[JobStatus.STARTED])] == [a2.id]
        assert [t.id for t in mgr.tasks("admin", statuses=[JobStatus.EXITED_OK,
                                                           JobStatus.EXITED_ERROR])] == [b1.id, a1.id]
        assert [t.id for t in mgr.tasks("admin", limit=1)] == [a2.id]
    finally:
        mgr.shutdown()


def test_retention_by_age_forgets_record_and_output(state_dir):
    mgr = make(state_dir, retention_age=0.3)
    try:
        old = mgr.start("alice", "echo", ["old"])
        running = mgr.start("alice", "sleep", ["300"])
        finished(mgr, old.id)
        # The periodic sweep runs every quarter of the retention age.
        poll_for(lambda: not mgr.tasks("alice", statuses=[JobStatus.EXITED_OK]), timeout=3,
                 message="the old task to be forgotten")
        with pytest.raises(NotFound):
            mgr.status("alice", old.id)
        assert not os.path.exists(os.path.join(mgr.output_dir, old.id + ".log"))
        assert mgr.status("alice", running.id).running
    finally:
        mgr.shutdown()
    again = make(state_dir, retention_age=0)
    try:
        with pytest.raises(NotFound):
            again.status("alice", old.id)
    finally:
        again.shutdown()


def test_retention_by_size_removes_oldest_first(state_dir):
    mgr = make(state_dir, retention_bytes=2500)
    try:
        ids = []
        for _ in range(3):
            ids.append(mgr.start("alice", "head", ["-c", "1000", "/dev/zero"]).id)
            finished(mgr, ids[-1])
            poll_for(lambda: ids[-1] not in mgr._tasks, message="its end recorded")
        # Enforced as each task ends: the third pushed the total over 2500.
        with pytest.raises(NotFound):
            mgr.status("alice", ids[0])
        assert [mgr.status("alice", i).output_size for i in ids[1:]] == [1000, 1000]
    finally:
        mgr.shutdown()


def test_output_cap_is_reported_in_the_status(state_dir):
    mgr = make(state_dir, output_max_bytes=4096)
    try:
        task = mgr.start("alice", "head", ["-c", "100000", "/dev/zero"])
        done = finished(mgr, task.id)
        assert done.output_size == 4096 and done.output_dropped > 0
        assert "cap" in done.output_note
        assert b"".join(mgr.stream("alice", task.id)).endswith(b"the rest is dropped]\n")
    finally:
        mgr.shutdown()


def test_listing_continues_after_a_task(state_dir):
    from taskman.errors import InvalidArgument

    mgr = make(state_dir)
    try:
        ids = [mgr.start("alice", "true").id for _ in range(5)]
        newest_first = ids[::-1]
        assert [t.id for t in mgr.tasks("alice", limit=2)] == newest_first[:2]
        assert [t.id for t in mgr.tasks("alice", limit=2, after=newest_first[1])] == newest_first[2:4]
        assert [t.id for t in mgr.tasks("alice", after=newest_first[3])] == newest_first[4:]
        with pytest.raises(InvalidArgument):
            mgr.tasks("alice", after="00000000-0000-4000-8000-000000000000")
    finally:
        mgr.shutdown()
