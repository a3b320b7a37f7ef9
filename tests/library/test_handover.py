"""The reload's hand-over file and the pieces of taskman.reload that need no server."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import gevent
import pytest
from gevent.monkey import get_original

from taskman import handover, reload
from taskman.errors import TaskmanError


def _state(pid=None, **task_fields):
    task = handover.TaskState(
        id="a7da14c7-b47a-4535-a263-5bb26e503002", owner="client001", command="/bin/sh",
        args=["-c", "echo hi"], pid=4242, start_time="2026-12-01T21:00:00+00:00",
        start_identity="boot:123", uid=70001, pipes=[handover.Pipe(stream=0, fd=17)],
        output_size=1234, index_records=3,
        group_directories={"memory": "/sys/fs/cgroup/memory/taskman/x"}, **task_fields)
    return handover.Handover(pid=os.getpid() if pid is None else pid, port=50051, tasks=[task])


def test_round_trip_atomic_and_private(state_dir):
    written = _state(stop_source="user", sent_signal=signal.SIGTERM, kill_at=123.5,
                     wait_status=None)
    path = handover.write(written, state_dir)
    assert path == os.path.join(state_dir, handover.FILE_NAME)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(state_dir) == [handover.FILE_NAME]  # no temporary left
    read = handover.read(path)
    assert read == written
    assert read.pids == [4242] and read.fds == [17]
    handover.remove(path)
    handover.remove(path)  # already gone: fine
    assert not os.path.exists(path)


def test_an_unknown_version_is_refused_in_one_sentence(state_dir):
    path = handover.write(_state(), state_dir)
    document = json.loads(open(path).read())
    document["version"] = handover.VERSION + 1
    open(path, "w").write(json.dumps(document))
    with pytest.raises(handover.HandoverError, match=r"format version 2; .* reads version 1"):
        handover.read(path)


@pytest.mark.parametrize("text", [
    "", "not json", "[]", '{"format": "other"}',
    '{"format": "taskman-handover", "version": 1}',
    '{"format": "taskman-handover", "version": 1, "pid": 1, "port": 1, "written_at": 0,'
    ' "tasks": [{"id": "x"}]}',
])
def test_malformed_files_are_refused(state_dir, text):
    path = os.path.join(state_dir, handover.FILE_NAME)
    open(path, "w").write(text)
    with pytest.raises(handover.HandoverError):
        handover.read(path)
    assert issubclass(handover.HandoverError, TaskmanError)


def test_unknown_task_fields_are_refused(state_dir):
    path = handover.write(_state(), state_dir)
    document = json.loads(open(path).read())
    document["tasks"][0]["from_the_future"] = 1
    open(path, "w").write(json.dumps(document))
    with pytest.raises(handover.HandoverError, match="malformed"):
        handover.read(path)


def test_another_process_hand_over_is_refused(state_dir):
    path = handover.write(_state(pid=os.getpid() + 1), state_dir)
    with pytest.raises(handover.HandoverError, match="not this one"):
        handover.read(path)


def test_missing_file(state_dir):
    with pytest.raises(handover.HandoverError, match="cannot read"):
        handover.read(os.path.join(state_dir, "nope.json"))


# -- taskman.reload

def test_installed_program(tmp_path, monkeypatch):
    program = tmp_path / "taskman-server"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert reload.installed_program(str(program)) == str(program)
    # Not an absolute taskman-server: the one on PATH.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert reload.installed_program("python -m something") == str(program)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(reload.ReloadRefused, match="none on PATH"):
        reload.installed_program("taskman-server")
    # Started as .venv/bin/taskman-server: relative to where the server started.
    monkeypatch.setattr(reload, "STARTED_IN", str(tmp_path.parent))
    assert reload.installed_program(f"{tmp_path.name}/taskman-server") == str(program)


def test_check_passes_and_fails_without_blocking_the_loop(tmp_path):
    program = tmp_path / "taskman-server"
    program.write_text('#!/bin/sh\nsleep 0.2\necho "checked $*"\n[ "$2" != --bad ]\n')
    program.chmod(0o755)
    ticks = []
    ticker = gevent.spawn(lambda: [gevent.sleep(ticks.append(1) or 0.001) for _ in range(1000)])
    passed, text = reload.check(str(program), ["--state-dir", "/x"])
    assert passed and text == "checked --check --state-dir /x"
    passed, text = reload.check(str(program), ["--bad"])
    assert not passed and "--bad" in text
    ticker.kill()
    assert ticks  # the loop ran while the checks did


def test_check_runs_ahead_of_the_tasks(tmp_path):
    """The check gets PRIORITY_BOOST (when this process may raise priorities)."""
    program = tmp_path / "taskman-server"
    program.write_text("#!/bin/sh\nsleep 0.2\nps -o ni= -p $$\n")
    program.chmod(0o755)
    passed, text = reload.check(str(program), [])
    own = os.getpriority(os.PRIO_PROCESS, 0)
    expected = max(own - reload.PRIORITY_BOOST, -20) if os.geteuid() == 0 else own
    assert passed and int(text) == expected, text


def test_check_that_hangs_is_killed(tmp_path):
    program = tmp_path / "taskman-server"
    program.write_text("#!/bin/sh\nexec sleep 30\n")
    program.chmod(0o755)
    started = time.monotonic()
    passed, text = reload.check(str(program), [], timeout=0.3)
    assert not passed and "did not finish" in text
    assert time.monotonic() - started < 5


def test_check_of_a_missing_program():
    passed, text = reload.check("/nonexistent/taskman-server", [])
    assert not passed and "cannot run" in text


def test_check_is_told_it_checks_for_a_reload(tmp_path):
    program = tmp_path / "taskman-server"
    program.write_text(f'#!/bin/sh\necho "${handover.CHECK_VARIABLE}"\n')
    program.chmod(0o755)
    assert reload.check(str(program), []) == (True, "1")
    assert handover.CHECK_VARIABLE not in os.environ  # the server's own stays as it was


def test_a_reloads_check_skips_what_only_informs(tmp_path, monkeypatch):
    """The file modes are not walked (the new image secures them at start)
    and the demo CA is not looked for; what the new image needs still fails."""
    import docopt

    from taskman.cli import check
    from taskman.cli import server as server_cli
    from taskman.cli.settings import Settings

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "open.log").write_text("")
    os.chmod(state / "open.log", 0o644)  # a mode the new image would fix
    monkeypatch.delenv("TASKMAN_CERTS_DIR", raising=False)

    def run(*argv, for_reload):
        lines = []
        options = docopt.docopt(server_cli.usage(), argv=["--check", "--state-dir", str(state),
                                                          "--cgroup-driver", "none", *argv])
        return check.run(Settings(options), out=lines.append, for_reload=for_reload), lines

    status, lines = run(for_reload=False)
    assert status == 1 and any(line.startswith("FAIL file modes") for line in lines), lines
    status, lines = run(for_reload=True)
    assert status == 0 and not any("file modes" in line for line in lines), lines
    status, lines = run("--server-cert", str(tmp_path / "missing.crt"), for_reload=True)
    assert status == 1 and any(line.startswith("FAIL certificates") for line in lines), lines


def test_guard_admits_one_reload_at_a_time():
    guard = reload.Guard()
    with guard as first:
        assert first
        with guard as second:
            assert not second
    with guard as again:
        assert again


def test_blocked_signal_waits_until_unblocked():
    # In a fresh interpreter: here, thread pools of other tests may take a
    # process-wide signal that this thread blocks.
    program = (
        "import os, signal\n"
        "from taskman import reload\n"
        "received = []\n"
        "signal.signal(signal.SIGHUP, lambda *_: received.append(1))\n"
        "reload.block_signal()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "assert received == [], received\n"
        "assert signal.SIGHUP in signal.sigpending()\n"
        "reload.unblock_signal()\n"
        "assert received == [1], received\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def _spawn(*argv):
    return os.posix_spawn(argv[0], list(argv), {})


def test_adopt_children_catches_exits_during_the_exec():
    """A child that exited before its watcher existed (its SIGCHLD spent)
    is found by the waitpid after the watchers; a live one by its watcher."""
    exited_early = _spawn("/bin/sh", "-c", "exit 3")
    running = _spawn("/bin/sh", "-c", "sleep 0.3; exit 5")
    # The real sleep: the loop does not run (and reap), as during an exec.
    get_original("time", "sleep")(0.1)
    watchers = {}

    def adopt(pid):
        watcher = gevent.get_hub().loop.child(pid, False)
        watcher.start(lambda: None)
        watchers[pid] = watcher

    exited = reload.adopt_children([exited_early, running], adopt)
    assert exited == {exited_early: 3 << 8}
    with gevent.Timeout(5):
        while not watchers[running].rpid:
            gevent.sleep(0.01)
    assert os.waitstatus_to_exitcode(watchers[running].rstatus) == 5
    for watcher in watchers.values():
        watcher.stop()


def test_adopt_children_reports_a_pid_that_is_not_ours():
    exited = reload.adopt_children([1], lambda pid: None)
    assert exited == {1: None}


def test_exec_failure_restores_the_descriptors(monkeypatch):
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(reload.ReloadRefused, match="cannot exec"):
            reload.exec_image("/nonexistent/taskman-server", [], "/x", [read_end], nice=0)
        assert not os.get_inheritable(read_end)
        assert handover.VARIABLE not in os.environ
        assert handover.NICE_VARIABLE not in os.environ
    finally:
        os.close(read_end)
        os.close(write_end)


def test_take_nice(monkeypatch):
    monkeypatch.setenv(handover.NICE_VARIABLE, "-3")
    assert reload.take_nice() == -3
    assert handover.NICE_VARIABLE not in os.environ
    assert reload.take_nice() is None
    monkeypatch.setenv(handover.NICE_VARIABLE, "x")
    assert reload.take_nice() is None


BOOST = """
import os, threading
from taskman import reload
before = os.getpriority(os.PRIO_PROCESS, 0)
nice = reload.boost_priority()
if nice is None:
    raise SystemExit(77)  # not allowed here (not root)
boosted = max(before - reload.PRIORITY_BOOST, -20)
assert nice == before and os.getpriority(os.PRIO_PROCESS, 0) == boosted
started, done, tids = threading.Event(), threading.Event(), []
def thread():
    tids.append(threading.get_native_id()); started.set(); done.wait(10)
worker = threading.Thread(target=thread); worker.start(); started.wait(10)
assert os.getpriority(os.PRIO_PROCESS, tids[0]) == boosted  # inherited
reload.restore_priority(nice)
assert os.getpriority(os.PRIO_PROCESS, 0) == before
assert os.getpriority(os.PRIO_PROCESS, tids[0]) == before
done.set(); worker.join()
"""


def test_boost_priority_then_restore_every_thread():
    """In a fresh interpreter: the boost is per thread, inherited by threads made
    after it, and restore_priority puts every thread back."""
    result = subprocess.run([sys.executable, "-c", BOOST], capture_output=True, text=True,
                            timeout=60)
    if result.returncode == 77:
        pytest.skip("this process may not raise its priority (not root)")
    assert result.returncode == 0, result.stderr


AUTOGROUP_BOOST = """
import os
from taskman import reload
def autogroup():
    with open(reload.AUTOGROUP) as file:
        return int(file.read().split()[-1])
before = autogroup()
nice = reload.boost_autogroup()
if nice is None:
    raise SystemExit(77)  # no autogroups here, or not root
assert nice == before and autogroup() == max(before - reload.PRIORITY_BOOST, -20)
os.environ[reload.handover_format.AUTOGROUP_NICE_VARIABLE] = str(nice)
reload.restore_autogroup(reload.take_autogroup_nice())
assert autogroup() == before
assert reload.handover_format.AUTOGROUP_NICE_VARIABLE not in os.environ
assert reload.take_autogroup_nice() is None
"""


def test_boost_autogroup_then_restore():
    """In a session of its own: the boost is the session's (its autogroup)."""
    result = subprocess.run([sys.executable, "-c", AUTOGROUP_BOOST], capture_output=True,
                            text=True, timeout=60, start_new_session=True)
    if result.returncode == 77:
        pytest.skip("no autogroup scheduling here, or not root")
    assert result.returncode == 0, result.stderr


def test_no_autogroup_boost_in_a_session_the_server_does_not_lead():
    """Started from a shell, the server shares the shell's session: its other
    processes are not taskman's, so their autogroup is left as it is."""
    if not os.path.exists(reload.AUTOGROUP):
        pytest.skip("no autogroup scheduling in this kernel")
    if os.getsid(0) == os.getpid():
        pytest.skip("this test process leads its own session")
    with open(reload.AUTOGROUP) as file:
        before = file.read()
    assert reload.boost_autogroup() is None
    with open(reload.AUTOGROUP) as file:
        assert file.read() == before


def test_take_handover_path(monkeypatch):
    monkeypatch.setenv(handover.VARIABLE, "/state/handover.json")
    assert reload.take_handover_path() == "/state/handover.json"
    assert handover.VARIABLE not in os.environ
    assert reload.take_handover_path() is None


def test_end_abandoned_kills_reaps_and_records(state_dir):
    pid = _spawn("/bin/sh", "-c", "sleep 30")
    from taskman import host

    identity = host.start_identity(pid)
    read_end, write_end = os.pipe()
    os.close(write_end)
    pipe_inode = os.fstat(read_end).st_ino
    state = _state()
    state.tasks[0].pid, state.tasks[0].start_identity = pid, identity
    state.tasks[0].pipes = [handover.Pipe(0, read_end)]
    state.tasks[0].group_directories = {}
    recorded = []
    assert reload.end_abandoned(state, lambda task_id, status: recorded.append(
        (task_id, status))) == 1
    assert recorded == [(state.tasks[0].id, signal.SIGKILL)]
    with pytest.raises(ChildProcessError):
        get_original("os", "waitpid")(pid, os.WNOHANG)  # reaped: no zombie left
    gevent.sleep(0.05)  # gevent's os.close of a pipe finishes on the hub
    try:  # the pipe was closed (its number may be reused since)
        assert os.fstat(read_end).st_ino != pipe_inode
    except OSError:
        pass


# -- taskman.adoption: the manager's running tasks into a hand-over, and a log back

def test_capture_after_pause_and_the_log_reopened_live(state_dir):
    from taskman import adoption
    from taskman.cgroups import select_driver
    from taskman.manager import TaskManager
    from taskman.output import Stream

    manager = TaskManager(state_dir=state_dir, driver=select_driver("none"), stop_grace=1)
    try:
        task = manager.start("client001", "/bin/sh", ["-c", "seq 1 200; exec sleep 30"])
        with gevent.Timeout(10):
            while manager.status("client001", task.id).output_size < len(
                    "".join(f"{i}\n" for i in range(1, 201))):
                gevent.sleep(0.01)
        entries = adoption.running(manager.entries())
        assert [entry.task.id for entry in entries] == [task.id]
        assert adoption.pause(entries, timeout=5)
        state = adoption.capture(entries, 4321, {}, {task.id: 70001})
        handed = state.tasks[0]
        entry = entries[0]
        assert (state.port, handed.pid, handed.uid) == (4321, task.pid, 70001)
        assert handed.output_size == entry.log.size == 692
        assert handed.index_records == entry.log.index_records >= 1
        assert [pipe.fd for pipe in handed.pipes] == [pipe.fd for pipe in entry.process.outputs]
        assert handed.stop_source == "" and handed.wait_status is None
        # The next image's log: live, at the same size, its index going on.
        reopened = adoption.log_of(handed, manager.output_dir, 0)
        assert (reopened.size, reopened.index_records) == (692, handed.index_records)
        reopened.append(b"after\n", Stream.COMBINED)
        assert reopened.size == 698 and reopened.index_records == handed.index_records + 1
        assert reopened.read(688) == b"200\nafter\n"
        reopened.finish()
        adoption.resume(entries)
    finally:
        manager.shutdown(timeout=1)


def test_the_parsed_command_line_is_handed_over_only_for_the_same_usage_and_argv(monkeypatch):
    from taskman.cli import parsed_options
    from taskman.cli.server import usage

    monkeypatch.delenv(parsed_options.VARIABLE, raising=False)
    text, argv = usage(), ["--server-address", "127.0.0.1:0", "--san", "a", "--san", "b"]
    options = {"--server-address": "127.0.0.1:0", "--san": ["a", "b"], "--check": False}
    parsed_options.pass_on(text, argv, options)
    assert parsed_options.handed_over(text, argv) == options
    assert parsed_options.VARIABLE not in os.environ  # taken once
    for other_text, other_argv in ((text + "  --new-option\n", argv), (text, argv[:2])):
        parsed_options.pass_on(text, argv, options)  # an upgrade changed the usage; other argv
        assert parsed_options.handed_over(other_text, other_argv) is None
    monkeypatch.setenv(parsed_options.VARIABLE, "{not json")
    assert parsed_options.handed_over(text, argv) is None


def test_the_new_image_parses_as_docopt_would(monkeypatch):
    import docopt

    from taskman.cli import parsed_options
    from taskman.cli import server as server_cli
    from taskman.errors import ConfigError

    argv = ["--server-address", "127.0.0.1:0", "--admin", "bob", "--stop-grace", "2"]
    parsed = dict(docopt.docopt(server_cli.usage(), argv=argv, default_help=False))
    seen = []

    def settings(options):  # stop main there: it has what it would serve with
        seen.append(options)
        raise ConfigError("enough")

    monkeypatch.setattr(server_cli, "Settings", settings)
    parsed_options.pass_on(server_cli.usage(), argv, parsed)
    monkeypatch.setattr(docopt, "docopt", lambda *args, **kwargs: pytest.fail("parsed again"))
    assert server_cli.main(argv) == server_cli.EXIT_USAGE
    assert seen == [parsed]
    # The reload's check runs with --check first: the same parse, checking.
    checking = ["--check", *argv]
    parsed_options.pass_on(server_cli.usage(), argv, parsed)
    handed = parsed_options.handed_over(server_cli.usage(), checking)
    monkeypatch.undo()
    assert handed == dict(docopt.docopt(server_cli.usage(), argv=checking, default_help=False))
    assert handed["--check"] is True


def test_adopted_tasks_are_supervised_again_a_batch_at_a_time():
    from taskman import adoption

    started, batches = [], []
    resumption = adoption._Resumption()
    for number in range(2 * adoption.RESUME_BATCH + 1):
        resumption.add(lambda number=number: started.append(number))
    gevent.sleep(0.05)
    assert started == []  # not before the new image listens
    resumption.listening.set()
    while resumption.greenlet is not None:
        batches.append(len(started))
        gevent.sleep(0)  # a busy start-up: the batches go in between
    assert started == list(range(2 * adoption.RESUME_BATCH + 1))
    seen = batches + [len(started)]
    steps = [after - before for before, after in zip(seen, seen[1:], strict=False)]
    assert max(steps) <= adoption.RESUME_BATCH and len(steps) >= 3


def test_adopted_tasks_with_output_waiting_are_supervised_first():
    """A follower waits for the bytes in its task's pipe: those tasks go
    before the silent ones, whatever order the hand-over named them in."""
    import types

    from taskman import adoption

    pipes = [os.pipe() for _ in range(3)]
    try:
        os.write(pipes[1][1], b"x" * 10)
        os.write(pipes[2][1], b"x" * 4000)
        entries = [types.SimpleNamespace(process=types.SimpleNamespace(
            outputs=[types.SimpleNamespace(fd=read_end)])) for read_end, _ in pipes]
        assert [adoption.waiting_bytes(entry) for entry in entries] == [0, 10, 4000]
        started = []
        resumption = adoption._Resumption()
        for number in range(2 * adoption.RESUME_BATCH):
            entry = entries[number] if number < 3 else entries[0]
            resumption.add(lambda number=number: started.append(number),
                           lambda entry=entry: adoption.waiting_bytes(entry))
        resumption.listening.set()
        resumption.greenlet.join(5)
        assert started[:3] == [2, 1, 0]
        assert started[3:] == list(range(3, 2 * adoption.RESUME_BATCH))  # ties keep their order
    finally:
        for ends in pipes:
            for end in ends:
                os.close(end)


def test_the_sessions_boost_lasts_until_every_adopted_task_is_supervised(monkeypatch):
    from taskman import adoption

    restored, started = [], []
    monkeypatch.setattr(reload, "restore_autogroup", restored.append)
    resumption = adoption._Resumption()
    resumption.autogroup_nice = 0
    for number in range(2 * adoption.RESUME_BATCH):
        resumption.add(lambda number=number: started.append(number))
    resumption.listening.set()
    gevent.sleep(0)
    assert restored == []  # still supervising
    resumption.greenlet.join(5)
    assert len(started) == 2 * adoption.RESUME_BATCH and restored == [0]
    resumption.restore_autogroup()
    assert restored == [0, None]  # once only


def test_adopted_tasks_are_supervised_even_if_the_server_never_listens(monkeypatch):
    from taskman import adoption

    monkeypatch.setattr(adoption, "LISTEN_WAIT", 0.05)
    started = []
    resumption = adoption._Resumption()
    resumption.add(lambda: started.append(1))
    resumption.greenlet.join(5)
    assert started == [1]


def test_the_reload_timeline_crosses_the_exec_in_the_environment(monkeypatch):
    from taskman import reload_timeline

    monkeypatch.delenv(reload_timeline.VARIABLE, raising=False)
    reload_timeline.start()
    reload_timeline.mark("checked")
    reload_timeline.hand_over()
    handed = os.environ[reload_timeline.VARIABLE]
    assert handed.startswith("sighup=") and ",checked=" in handed
    # The new image: its own marks come after the old image's.
    reload_timeline._marks.clear()
    reload_timeline.mark("main")
    reload_timeline.take()
    assert reload_timeline.VARIABLE not in os.environ  # no task sees it
    steps = reload_timeline.summary().split(", ")
    assert [step.split()[0] for step in steps] == ["checked", "main"]
    assert all(float(step.split()[1]) >= 0 for step in steps)
    assert reload_timeline.since_sighup() >= 0


def test_no_reload_timeline_without_a_sighup_or_from_a_garbled_variable(monkeypatch):
    from taskman import reload_timeline

    reload_timeline._marks.clear()
    monkeypatch.setenv(reload_timeline.VARIABLE, "sighup=not-a-number")
    reload_timeline.mark("main")
    reload_timeline.take()
    assert reload_timeline.summary() is None and reload_timeline.since_sighup() is None
    reload_timeline.start()
    reload_timeline.withdraw()
    assert reload_timeline.VARIABLE not in os.environ
