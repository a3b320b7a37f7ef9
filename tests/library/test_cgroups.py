"""The host's real cgroup driver (hybrid here, v2 on a pure v2 host) through
the real TaskManager: limits hold, stop kills whole trees, groups go away.

Needs root and cgroups; skips with the reason otherwise. Every test uses its
own root name (``taskman-test-<pid>-<n>``): hierarchies such as v1 cpu are
shared by the whole host, and the default root belongs to a real server.
"""

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import gevent
import pytest

from support import poll_for, processes_of, timed_direct_io
from taskman import cgroups, task_groups
from taskman.cgroups import Limits, cgroupfs, detect
from taskman.errors import CgroupError
from taskman.manager import TaskManager
from taskman.output import log_path
from taskman.task import JobStatus, Source, is_task_id

PY = sys.executable
MiB = 1 << 20
_names = itertools.count()

pytestmark = pytest.mark.timeout(60)


def root_name():
    return f"taskman-test-{os.getpid()}-{next(_names)}"


def select_or_skip(limits=None, root=None, **keywords):
    if os.geteuid() != 0:
        pytest.skip(f"needs root: cgroups are managed by root (uid {os.geteuid()})")
    try:
        return cgroups.select_driver("auto", limits or Limits(), root=root or root_name(),
                                     **keywords)
    except CgroupError as error:
        pytest.skip(f"no cgroup driver on this host: {error}")


def _groups_left(driver):
    return {hierarchy.base: cgroupfs.subgroups(hierarchy.base)
            for hierarchy in driver.hierarchies if cgroupfs.subgroups(hierarchy.base)}


def _task_groups_left(driver):
    """Task groups (not slices, which outlive their last task by
    task_groups.SLICE_LINGER) anywhere under the bases."""
    return [path for hierarchy in driver.hierarchies for path in cgroupfs.walk(hierarchy.base)
            if is_task_id(os.path.basename(path))]


@pytest.fixture
def run(state_dir):
    """Make managers with the real driver; at the end shut them down and
    check that no task group (nor base directory) is left."""
    made = []

    def make(limits=None, stop_grace=1.0, root=None):
        driver = select_or_skip(limits, root, io_paths=(state_dir,))
        manager = TaskManager(os.path.join(state_dir, str(len(made))), driver=driver,
                              stop_grace=stop_grace)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown(timeout=15)
        driver = manager.driver
        left = _groups_left(driver)
        for hierarchy in driver.hierarchies:  # never leak into the host, even on failure
            for name in cgroupfs.subgroups(hierarchy.base):
                cgroupfs.remove_directory(os.path.join(hierarchy.base, name))
            cgroupfs.remove_if_unused(hierarchy.base)
        assert not left, f"groups left after shutdown: {left}"
        assert not [h.base for h in driver.hierarchies if os.path.exists(h.base)]


def wait_ended(manager, task_id, timeout=20):
    return poll_for(lambda: (lambda task: None if task.running else task)(
        manager.status("alice", task_id)), timeout=timeout, message=f"task {task_id} to end")


def output_of(manager, task_id):
    with gevent.Timeout(30):
        return b"".join(manager.stream("alice", task_id)).decode()


# -- limits


def test_memory_limit_ends_in_oom_kill(run):
    manager = run(Limits(memory_max=64 * MiB))
    task = manager.start("alice", PY, ["-c", "data = b'x' * (256 << 20)"])
    ended = wait_ended(manager, task.id)
    assert (ended.status, ended.signal, ended.source) == (JobStatus.SIGNALED, "SIGKILL",
                                                          Source.OOM)


def test_memory_under_the_limit_is_fine(run):
    manager = run(Limits(memory_max=64 * MiB))
    task = manager.start("alice", PY, ["-c", "data = b'x' * (16 << 20)"])
    assert wait_ended(manager, task.id).status == JobStatus.EXITED_OK


def test_busy_loop_is_held_near_20_percent_of_a_cpu(run):
    manager = run()  # the RFD's 200000/1000000
    program = ("import time\nstart = time.monotonic()\n"
               "while time.monotonic() - start < 2.5: pass\n"
               "print(time.process_time() / (time.monotonic() - start))")
    task = manager.start("alice", PY, ["-c", program])
    wait_ended(manager, task.id)
    share = float(output_of(manager, task.id))
    print(f"cpu share under 200000/1000000: {share:.1%}")
    assert 0.10 <= share <= 0.35


def test_fork_loop_is_held_at_the_pids_limit(run):
    manager = run(Limits(pids_max=20))
    # At most 60 forks whatever happens, so a broken limit cannot bomb the host.
    program = ("import os, sys, time\nmade = 0\nfor _ in range(60):\n"
               "    try:\n        pid = os.fork()\n    except OSError:\n        continue\n"
               "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
               "    made += 1\nprint(made, flush=True)\ntime.sleep(30)")
    task = manager.start("alice", PY, ["-c", program])
    made = int(poll_for(lambda: output_of_so_far(manager, task.id), timeout=15,
                        message="the fork count"))
    assert made == 19  # 20 processes: the forker and its 19 children
    manager.stop("alice", task.id)
    assert not processes_of(task.id)


def output_of_so_far(manager, task_id):
    path = log_path(manager.output_dir, task_id)  # the output file, read without following
    with open(path, "rb") as output:
        text = output.read().decode()
    return text.strip() if text.endswith("\n") else ""


def test_direct_io_is_throttled(run, state_dir):
    driver = select_or_skip(Limits(), io_paths=(state_dir,))
    if detect.backing_devices([state_dir]) != driver.devices:
        pytest.skip(f"{state_dir} is not on the throttled device {driver.devices}")
    size = 30
    manager = run(Limits(io_read_bps=10 * MiB, io_write_bps=10 * MiB))
    durations = {}
    for name, (task, ended, seconds) in timed_direct_io(manager, state_dir, size, 30).items():
        durations[name] = seconds
        assert ended.status == JobStatus.EXITED_OK, output_of(manager, task.id)
        print(f"direct {name} of {size} MiB at 10 MiB/s: {durations[name]:.2f} s; "
              f"dd says {output_of(manager, task.id).splitlines()[-1]}")
    assert durations["read"] >= 2.0 and durations["write"] >= 2.0


# -- stop, leftovers, groups


def test_stop_kills_the_whole_tree_including_setsid(run):
    manager = run(stop_grace=0.5)
    # Everything ignores SIGTERM, so the stop must come down to the kill.
    task = manager.start("alice", "sh", ["-c", "trap '' TERM; sleep 1000 & sleep 1000 & "
                                               "setsid sleep 1000 & wait"])
    poll_for(lambda: len(processes_of(task.id)) == 4, message="the tree to start")
    started = time.monotonic()
    stopped = manager.stop("alice", task.id)
    took = time.monotonic() - started
    assert (stopped.status, stopped.signal, stopped.source) == (JobStatus.SIGNALED, "SIGKILL",
                                                                Source.USER)
    assert not processes_of(task.id)
    print(f"stop with 0.5 s grace, TERM ignored: {took * 1000:.0f} ms")
    assert took < 2.0


def test_stop_with_sigterm_reaches_every_process(run):
    manager = run(stop_grace=5.0)
    task = manager.start("alice", "sh", ["-c", "sleep 1000 & setsid sleep 1000 & wait"])
    poll_for(lambda: len(processes_of(task.id)) == 3, message="the tree to start")
    started = time.monotonic()
    stopped = manager.stop("alice", task.id)
    assert time.monotonic() - started < 2.0  # no waiting for the 5 s grace
    assert (stopped.signal, stopped.source) == ("SIGTERM", Source.USER)
    assert not processes_of(task.id)


def test_leftovers_die_with_the_main_process_and_groups_go(run):
    manager = run()
    task = manager.start("alice", "sh", ["-c", "setsid sleep 1000 & echo started"])
    ended = wait_ended(manager, task.id)
    assert ended.status == JobStatus.EXITED_OK
    assert output_of(manager, task.id) == "started\n"
    assert not processes_of(task.id)
    poll_for(lambda: not _groups_left(manager.driver), message="the groups to be removed")


def test_a_slice_outlives_its_last_task_for_the_next_and_goes_at_shutdown(run, monkeypatch):
    """A task's groups go before "ended"; its user's slice stays for the
    user's next task (the same directory, not made again) and goes at
    shutdown without waiting out the linger (the fixture checks)."""
    monkeypatch.setattr(task_groups, "SLICE_LINGER", 60.0)
    manager = run()
    first = manager.start("alice", "true")
    wait_ended(manager, first.id)
    assert not _task_groups_left(manager.driver)
    left = _groups_left(manager.driver)
    assert list(left.values()) == [["user-name-alice"]] * len(manager.driver.hierarchies)
    slice_directory = os.path.join(manager.driver.hierarchies[0].base, "user-name-alice")
    made = os.stat(slice_directory).st_ino
    second = manager.start("alice", "true")
    wait_ended(manager, second.id)
    assert os.stat(slice_directory).st_ino == made
    assert not _task_groups_left(manager.driver)


def test_stale_groups_of_an_earlier_run_are_removed_at_setup(run, caplog):
    caplog.set_level(logging.INFO, logger="taskman.cgroups")
    root = root_name()
    driver = select_or_skip(root=root)
    stale_id = str(uuid.uuid4())
    stray = subprocess.Popen(["sleep", "1000"])
    made = []
    try:
        for hierarchy in driver.hierarchies:
            os.makedirs(hierarchy.base, exist_ok=True)
            directory = os.path.join(hierarchy.base, stale_id)
            os.mkdir(directory)
            made.append(directory)
            cgroupfs.write(os.path.join(directory, "cgroup.procs"), str(stray.pid))
        foreign = os.path.join(driver.hierarchies[0].base, "not-a-task")
        os.mkdir(foreign)
        run(root=root)  # its setup() cleans up
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert not [directory for directory in made if os.path.exists(directory)]
        assert os.path.isdir(foreign)  # not ours: left alone
        os.rmdir(foreign)
        # The operator is told what was removed and what was left alone.
        assert f"removed task group {stale_id} left by an earlier run" in caplog.text
        assert f"leaving {foreign} alone: not a task group" in caplog.text
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
        for directory in made:
            if os.path.exists(directory):
                cgroupfs.remove_directory(directory)


def test_forced_freezer_kill_ends_a_whole_tree_including_setsid(monkeypatch):
    """The kill of kernels without cgroup.kill (before 5.14) for real: freeze
    the group, SIGKILL every process it lists in one pass, thaw."""
    driver = select_or_skip()
    driver.use_cgroup_kill = False
    freezers = [hierarchy for hierarchy in driver.hierarchies if hierarchy.freezer_file]
    if not freezers:
        pytest.skip(f"the {driver.name} driver has no freezer")
    freezer = freezers[0]
    driver.setup()
    task_id = str(uuid.uuid4())
    group = driver.create(task_id)
    tree = None
    try:
        tree = subprocess.Popen(
            ["sh", "-c", "trap '' TERM; sleep 1000 & sleep 1000 & setsid sleep 1000 & wait"],
            env=dict(os.environ, TASKMAN_TASK_ID=task_id),
            preexec_fn=lambda: driver.place(group, os.getpid()))
        poll_for(lambda: len(processes_of(task_id)) == 4, message="the tree to start")
        writes, sweeps = [], []
        write, signal_listed = cgroupfs.write, cgroupfs.signal_listed

        def recording_write(path, value):
            writes.append((os.path.basename(path), value))
            write(path, value)

        def recording_signal_listed(directories, number):
            frozen = _is_frozen(freezer, group.directories[freezer.name])
            sent = signal_listed(directories, number)
            sweeps.append((number, frozen, sent))
            return sent

        monkeypatch.setattr(cgroupfs, "write", recording_write)
        monkeypatch.setattr(cgroupfs, "signal_listed", recording_signal_listed)
        driver.kill(group)
        monkeypatch.undo()

        assert tree.wait(timeout=5) == -signal.SIGKILL
        poll_for(lambda: driver.is_empty(group), message="the group to empty")
        assert not processes_of(task_id)
        frozen, thawed = ("FROZEN", "THAWED") if freezer.version == 1 else ("1", "0")
        assert writes == [(freezer.freezer_file, frozen), (freezer.freezer_file, thawed)]
        # One sweep, while frozen, reached all four: none could fork or hide.
        assert sweeps == [(signal.SIGKILL, True, 4)]
    finally:
        driver.use_cgroup_kill = True
        if tree is not None and tree.poll() is None:
            driver.kill(group)
            tree.wait(timeout=5)
        poll_for(lambda: driver.is_empty(group), message="the group to empty")
        driver.remove(group)
        driver.close()
    assert not [hierarchy.base for hierarchy in driver.hierarchies
                if os.path.exists(hierarchy.base)]


def _is_frozen(hierarchy, directory):
    if hierarchy.version == 1:
        return cgroupfs.read(os.path.join(directory, "freezer.state")).strip() == "FROZEN"
    return cgroupfs.keyed(os.path.join(directory, "cgroup.events")).get("frozen") == 1


def test_a_second_server_on_the_same_root_is_refused(run, state_dir):
    root = root_name()
    run(root=root)
    with pytest.raises(CgroupError, match="in use by another taskman server"):
        TaskManager(os.path.join(state_dir, "second"), driver=select_or_skip(root=root))


def test_a_task_that_cannot_join_a_group_ends_before_its_command_runs(run, monkeypatch, tmp_path):
    """The gate joins the task's groups itself, after the start's reply: a
    failure to join the second ends the task (exit 125, the group named on
    its output) before the command ran, and leaves nothing behind."""
    manager = run()
    files = manager.driver.procs_files
    if len(manager.driver.hierarchies) < 2:
        pytest.skip("a single hierarchy: no second group to fail")

    def second_missing(group):
        first, second, *rest = files(group)
        return (first, second + ".missing", *rest)

    monkeypatch.setattr(manager.driver, "procs_files", second_missing)
    marker = tmp_path / "ran"
    task = manager.start("alice", "touch", [str(marker)])
    ended = wait_ended(manager, task.id)
    assert ended.exit_code == 125
    output = b"".join(manager.stream("alice", task.id)).decode()
    assert "cannot join the task's cgroup" in output and ".missing" in output
    assert not marker.exists()
    assert not _task_groups_left(manager.driver)  # gone before "ended"
    poll_for(lambda: not _groups_left(manager.driver), message="the slice to go after its task")


# create() failing in the middle (memory is made after unified and cpu) and
# at the end (pids).
@pytest.mark.parametrize("failing, nth", [("memory.limit_in_bytes", 1), ("pids.max", 1)])
def test_a_failed_create_leaves_nothing_behind(run, monkeypatch, failing, nth):
    manager = run()
    write = cgroupfs.write
    calls = []

    def failing_write(path, value):
        calls.append(path)
        if path.endswith("/" + failing) and sum(c.endswith("/" + failing) for c in calls) == nth:
            raise CgroupError(f"cannot write {path}: injected failure")
        write(path, value)

    monkeypatch.setattr(cgroupfs, "write", failing_write)
    if not any(failing in str(hierarchy.settings) for hierarchy in manager.driver.hierarchies):
        pytest.skip(f"{failing} is not used by the {manager.driver.name} driver")
    with pytest.raises(CgroupError, match="injected failure"):
        manager.start("alice", "sleep", ["1000"])
    monkeypatch.setattr(cgroupfs, "write", write)
    assert not _groups_left(manager.driver)
    assert not manager.tasks("alice")
    leftover = [pid for pid in _children() if "sleep" in _command(pid)]
    assert not leftover


def _children():
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[1] == me:
                    found.append(int(name))
        except (OSError, IndexError):
            continue
    return found


def _command(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_removing_a_group_lists_it_only_when_groups_are_beneath_it(tmp_path, monkeypatch):
    # A plain rmdir first; the tree is walked (a scandir of every interface
    # file) only when the kernel refuses because of groups beneath.
    lone = tmp_path / "lone"
    lone.mkdir()
    walked = []
    walk = cgroupfs.walk
    monkeypatch.setattr(cgroupfs, "walk", lambda path: walked.append(path) or walk(path))
    cgroupfs.remove_directory(str(lone))
    assert not lone.exists() and walked == []
    nested = tmp_path / "nested"
    (nested / "made-by-the-task" / "deeper").mkdir(parents=True)
    cgroupfs.remove_directory(str(nested))
    assert not nested.exists() and walked[0] == str(nested)
    cgroupfs.remove_directory(str(nested))  # already gone: fine


def test_a_group_without_groups_beneath_is_not_listed(tmp_path, monkeypatch):
    # kernfs (like tmpfs and ext4) counts a directory's links as 2 plus its
    # subdirectories: at 2 the walk skips the scandir of its interface files.
    listed = []
    subgroups = cgroupfs.subgroups
    monkeypatch.setattr(cgroupfs, "subgroups", lambda path: listed.append(path) or subgroups(path))
    (tmp_path / "task" / "inner").mkdir(parents=True)
    (tmp_path / "task" / "cgroup.procs").write_text("")
    assert list(cgroupfs.walk(str(tmp_path / "task"))) == [str(tmp_path / "task"),
                                                           str(tmp_path / "task" / "inner")]
    assert listed == [str(tmp_path / "task")]
    assert list(cgroupfs.walk(str(tmp_path / "gone"))) == []
    assert list(cgroupfs.walk(str(tmp_path / "task" / "cgroup.procs"))) == []
