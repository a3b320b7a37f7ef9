"""TaskManager against real processes: lifecycle, output, stop, trees, errors.

Each test runs once per driver this host can provide: ``none`` (process
groups) always, ``cgroup`` (the host's real cgroup driver) when available.
"""

import hashlib
import os
import signal
import sys
import time
import uuid

import gevent
import gevent.event
import pytest

from support import driver_for_tests, fixture, poll_for, process_running
from taskman import cgroups
from taskman.errors import CommandNotFound, InvalidArgument, NotExecutable, NotFound, Unavailable
from taskman.manager import TaskManager
from taskman.task import JobStatus, Source

PY = sys.executable


@pytest.fixture(params=["none", "cgroup"])
def manager(request, state_dir):
    mgr = TaskManager(state_dir, driver=driver_for_tests(request.param), stop_grace=2.0)
    yield mgr
    mgr.shutdown(timeout=15)


def wait_ended(mgr, task_id, owner="alice", timeout=10):
    return poll_for(lambda: (lambda t: t if not t.running else None)(mgr.status(owner, task_id)),
                    timeout=timeout, message=f"task {task_id} to end")


def output_of(mgr, task_id, owner="alice"):
    with gevent.Timeout(30):
        return b"".join(mgr.stream(owner, task_id))


# -- lifecycle and status


def test_exit_ok_records_everything(manager):
    task = manager.start("alice", "true")
    assert task.status == JobStatus.STARTED and task.pid > 0 and task.start_time
    done = wait_ended(manager, task.id)
    assert done.status == JobStatus.EXITED_OK
    assert done.exit_code == 0 and done.signal == "" and done.source == Source.NONE
    assert done.end_time >= done.start_time


@pytest.mark.parametrize("code", [1, 3, 42, 255])
def test_exit_codes(manager, code):
    task = manager.start("alice", "sh", ["-c", f"exit {code}"])
    done = wait_ended(manager, task.id)
    assert (done.status, done.exit_code, done.source) == (JobStatus.EXITED_ERROR, code, Source.NONE)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGUSR1])
def test_signal_not_sent_by_taskman_is_source_system(manager, sig):
    task = manager.start("alice", "sh", ["-c", f"kill -{sig.name[3:]} $$"])
    done = wait_ended(manager, task.id)
    assert done.status == JobStatus.SIGNALED
    assert (done.signal, done.exit_code, done.source) == (sig.name, 128 + sig, Source.SYSTEM)


def test_uuid_v4_ids_are_unique(manager):
    ids = {manager.start("alice", "true").id for _ in range(20)}
    assert len(ids) == 20
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_a_given_task_id_is_used_once_and_must_be_canonical(manager):
    chosen = str(uuid.uuid4())
    task = manager.start("alice", "/bin/echo", ["mine"], task_id=chosen)
    assert task.id == chosen
    assert wait_ended(manager, chosen).exit_code == 0
    assert output_of(manager, chosen) == b"mine\n"
    for taken_or_bad in (chosen, chosen.upper(), "../x", ""):
        with pytest.raises(InvalidArgument):
            manager.start("alice", "/bin/true", task_id=taken_or_bad)


def test_task_sees_only_stdio_and_default_signals(manager):
    # Exec'd directly, so these are exactly what the task inherits.
    fds = output_of(manager, manager.start("alice", "ls", ["/proc/self/fd"]).id).split()
    assert fds == [b"0", b"1", b"2", b"3"]  # 3: the directory ls is listing
    status = output_of(manager, manager.start("alice", "cat", ["/proc/self/status"]).id).decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines())
    assert int(fields["SigBlk"], 16) == 0
    # Nothing is ignored (the server itself ignores SIGPIPE); glibc's internal
    # real-time signals 32 and 33 may show.
    assert int(fields["SigIgn"], 16) & ~((1 << 31) | (1 << 32)) == 0


def test_stdin_is_dev_null_and_cwd_is_root(manager):
    task = manager.start("alice", "sh", ["-c", "pwd; cat; echo end"])
    assert output_of(manager, task.id) == b"/\nend\n"


def test_environment_is_small_and_names_the_task(manager):
    os.environ["TASKMAN_SECRET_FOR_TEST"] = "leak"
    try:
        task = manager.start("alice", "env")
    finally:
        del os.environ["TASKMAN_SECRET_FOR_TEST"]
    env = dict(line.split("=", 1) for line in output_of(manager, task.id).decode().splitlines())
    assert env["TASKMAN_TASK_ID"] == task.id and env["TASKMAN_USER"] == "alice"
    assert "TASKMAN_SECRET_FOR_TEST" not in env and "PATH" in env


# -- output


def test_stdout_and_stderr_interleave_in_write_order(manager):
    script = "import sys\nfor i in range(200):\n  s = sys.stdout if i % 2 else sys.stderr\n" \
             "  s.write(f'{i}\\n'); s.flush()\n"
    task = manager.start("alice", PY, ["-c", script])
    assert output_of(manager, task.id) == b"".join(b"%d\n" % i for i in range(200))


def test_binary_output_is_byte_exact(manager):
    task = manager.start("alice", PY, ["-c", "import sys; sys.stdout.buffer.write(bytes(range(256)) * 1000)"])
    assert output_of(manager, task.id) == bytes(range(256)) * 1000


def test_20_mb_of_output(manager):
    script = ("import sys, hashlib\nblock = hashlib.sha256(b'x').digest() * 2048\n"
              "for _ in range(320): sys.stdout.buffer.write(block)\n")
    task = manager.start("alice", PY, ["-c", script])
    data = output_of(manager, task.id)
    block = hashlib.sha256(b"x").digest() * 2048
    assert len(data) == 320 * len(block) == 20_971_520
    assert data == block * 320
    # Kept on disk, not in memory.
    assert os.path.getsize(os.path.join(manager.output_dir, task.id + ".log")) == len(data)


def test_late_reader_starts_from_byte_zero(manager):
    task = manager.start("alice", "sh", ["-c", "echo first; sleep 0.3; echo second"])
    early = gevent.spawn(output_of, manager, task.id)
    wait_ended(manager, task.id)
    late = output_of(manager, task.id)
    assert late == early.get(timeout=10) == b"first\nsecond\n"


def test_follower_receives_output_while_task_runs(manager):
    task = manager.start("alice", "sh", ["-c", "echo one; sleep 30"])
    stream = manager.stream("alice", task.id)
    with gevent.Timeout(5):
        assert next(stream) == b"one\n"
    assert manager.status("alice", task.id).running
    manager.stop("alice", task.id)
    with gevent.Timeout(10):
        assert list(stream) == []


def test_50_concurrent_readers_each_get_everything(manager):
    script = ("import sys, time\nfor i in range(2000):\n  print(i)\n"
              "  if i % 500 == 0: sys.stdout.flush(); time.sleep(0.05)\n")
    task = manager.start("alice", PY, ["-c", script])
    readers = [gevent.spawn(output_of, manager, task.id) for _ in range(50)]
    expected = "".join(f"{i}\n" for i in range(2000)).encode()
    assert [r.get(timeout=30) for r in readers] == [expected] * 50


def test_cancelled_reader_releases_its_greenlet(manager):
    task = manager.start("alice", "sleep", ["30"])
    cancelled = gevent.event.Event()
    log = manager._tasks[task.id].log
    reader = gevent.spawn(lambda: list(manager.stream("alice", task.id, cancelled)))
    poll_for(lambda: log._readers == 1, message="reader to attach")
    cancelled.set()
    assert reader.get(timeout=2) == []
    assert log._readers == 0
    assert manager.status("alice", task.id).running


def test_orphan_holding_the_pipe_does_not_hang_the_stream(manager):
    start = time.monotonic()
    task = manager.start("alice", "sh", ["-c", "echo bye; sleep 300 &"])
    assert output_of(manager, task.id) == b"bye\n"
    assert time.monotonic() - start < 5
    assert wait_ended(manager, task.id).status == JobStatus.EXITED_OK


# -- stop


def test_stop_sends_sigterm_first(manager):
    task = manager.start("alice", "sleep", ["300"])
    done = manager.stop("alice", task.id)
    assert (done.status, done.signal, done.source) == (JobStatus.SIGNALED, "SIGTERM", Source.USER)
    assert done.exit_code == 128 + signal.SIGTERM


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(manager):
    task = manager.start("alice", PY, ["-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                             "print('ready', flush=True)\ntime.sleep(300)"])
    next(manager.stream("alice", task.id))  # the handler is in place
    start = time.monotonic()
    done = manager.stop("alice", task.id)
    elapsed = time.monotonic() - start
    assert (done.status, done.signal, done.source) == (JobStatus.SIGNALED, "SIGKILL", Source.USER)
    assert manager.stop_grace <= elapsed < manager.stop_grace + 3


def test_task_that_exits_cleanly_on_sigterm_reports_the_stop(manager):
    task = manager.start("alice", fixture("term_then_exit.sh"))
    next(manager.stream("alice", task.id))
    done = manager.stop("alice", task.id)
    assert (done.status, done.exit_code, done.signal, done.source) == \
        (JobStatus.EXITED_OK, 0, "SIGTERM", Source.USER)


def test_stop_kills_the_whole_tree(manager):
    task = manager.start("alice", fixture("orphans.sh"))
    stream = manager.stream("alice", task.id)
    with gevent.Timeout(5):
        child = int(next(stream))
    assert process_running(child)
    manager.stop("alice", task.id)
    poll_for(lambda: not process_running(child), timeout=5, message="children to die")


def test_stop_right_after_start_is_not_lost(manager):
    manager.stop_grace = 5.0
    for _ in range(20):
        task = manager.start("alice", "sleep", ["300"])
        done = manager.stop("alice", task.id)
        # SIGTERM was honoured at once: no wait for the grace, no SIGKILL.
        assert (done.status, done.signal) == (JobStatus.SIGNALED, "SIGTERM")


def test_stop_of_finished_task_changes_nothing(manager):
    task = manager.start("alice", "true")
    before = wait_ended(manager, task.id)
    assert manager.stop("alice", task.id) == before


def test_immediate_sigkill_when_grace_is_zero(state_dir):
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=0)
    try:
        done = mgr.stop("alice", mgr.start("alice", "sleep", ["300"]).id)
        assert (done.status, done.signal, done.source) == (JobStatus.SIGNALED, "SIGKILL", Source.USER)
    finally:
        mgr.shutdown()


def test_shutdown_ends_running_tasks_with_source_server(state_dir):
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=1)
    task = mgr.start("alice", "sleep", ["300"])
    mgr.shutdown()
    done = mgr.status("alice", task.id)
    assert (done.status, done.source) == (JobStatus.SIGNALED, Source.SERVER)
    assert not process_running(task.pid)
    with pytest.raises(Unavailable):
        mgr.start("alice", "true")


# -- access


def test_other_users_get_not_found_admin_gets_everything(manager):
    task = manager.start("alice", "sleep", ["30"])
    for call in (manager.status, manager.stop, manager.stream):
        with pytest.raises(NotFound) as mallory:
            call("mallory", task.id)
        with pytest.raises(NotFound) as nobody:
            call("alice", "00000000-0000-4000-8000-000000000000")
        assert str(mallory.value).replace(task.id, "X") == \
            str(nobody.value).replace("00000000-0000-4000-8000-000000000000", "X")
    assert manager.status("admin", task.id).owner == "alice"
    assert manager.stop("admin", task.id).source == Source.USER


@pytest.mark.parametrize("bad", ["", "x", "a7da14c7-b47a-4535-a263-5bb26e50300", "../../etc/passwd",
                                 "a7da14c7b47a4535a2635bb26e503002xxxx", "{a7da14c7-b47a-4535-a263-5bb26e5030}"])
def test_malformed_task_id_is_invalid_argument(manager, bad):
    with pytest.raises(InvalidArgument):
        manager.status("alice", bad)


def test_task_id_is_case_insensitive(manager):
    task = manager.start("alice", "true")
    assert manager.status("alice", task.id.upper()).id == task.id


# -- bad commands


@pytest.mark.parametrize("command,error", [
    ("no-such-command-xyz", CommandNotFound),
    ("/no/such/binary", CommandNotFound),
    ("/etc", NotExecutable),
    ("/etc/passwd", NotExecutable),
    ("", InvalidArgument),
    ("bin/ls", InvalidArgument),
    ("ls\0", InvalidArgument),
])
def test_spawn_errors(manager, command, error):
    before = set(os.listdir(manager.output_dir))
    with pytest.raises(error):
        manager.start("alice", command)
    assert set(os.listdir(manager.output_dir)) == before
    assert manager.tasks("admin") == []


@pytest.mark.parametrize("argument", ["a\0b", "\udcff"])
def test_unpassable_arguments(manager, argument):
    with pytest.raises(InvalidArgument):
        manager.start("alice", "echo", [argument])


def test_argument_list_too_long(manager):
    with pytest.raises(InvalidArgument, match="too long"):
        manager.start("alice", "echo", ["x" * 200_000] * 20)
    assert os.listdir(manager.output_dir) == []


def test_arguments_are_passed_verbatim(manager):
    args = ["-n", "a b", "$HOME", "'q'", "--", "é", ""]
    task = manager.start("alice", PY, ["-c", "import sys; print(repr(sys.argv[1:]))", *args])
    assert output_of(manager, task.id).decode().strip() == repr(args)


def test_descriptors_the_server_inherited_do_not_reach_tasks(state_dir):
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)  # as if the server's parent leaked it
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"))
    try:
        task = mgr.start("alice", "ls", ["/proc/self/fd"])
        assert output_of(mgr, task.id).split() == [b"0", b"1", b"2", b"3"]
    finally:
        mgr.shutdown()
        os.close(read_end)
        os.close(write_end)


def test_listeners_hear_start_stop_and_end(manager):
    heard = []
    manager.listeners.append(lambda event, task: heard.append((event, task.status, task.source)))
    manager.listeners.append(lambda event, task: 1 / 0)  # a broken one changes nothing
    task = manager.start("alice", "sleep", ["300"])
    manager.stop("alice", task.id)
    poll_for(lambda: len(heard) == 3, message="three events")
    assert heard == [("started", JobStatus.STARTED, Source.NONE),
                     ("stopping", JobStatus.STARTED, Source.USER),
                     ("ended", JobStatus.SIGNALED, Source.USER)]


def test_stop_returns_within_its_bound_when_the_grace_is_long(state_dir, monkeypatch):
    import taskman.manager as manager_module

    monkeypatch.setattr(manager_module, "STOP_WAIT_MAX", 0.5)
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=60)
    try:
        task = mgr.start("alice", fixture("unkillable.sh"))
        next(mgr.stream("alice", task.id))
        started = time.monotonic()
        assert mgr.stop("alice", task.id).running  # still in its grace period
        assert time.monotonic() - started < 2
        assert mgr.status("alice", task.id).running
        # Shutting down does not wait out the user's stop: past its own bound
        # it kills what is left, so no task outlives the server.
        started = time.monotonic()
        mgr.shutdown(timeout=0.5)
        assert time.monotonic() - started < 5
        done = mgr.status("alice", task.id)
        assert (done.status, done.signal, done.source) == (JobStatus.SIGNALED, "SIGKILL", Source.USER)
        assert not process_running(task.pid)
    finally:
        mgr.shutdown(timeout=0)
