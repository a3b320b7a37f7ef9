"""The manager's side of the sandbox, with real processes: tasks as the
owner's uid, the uid and start identity in the store, a main process that
left its groups reported and still stopped through its pidfd, the state
directory's modes fixed, crash recovery by start identity alone."""

import os
import signal
import stat

import gevent
import pytest

from support import poll_for, process_running, skip_needs_root
from taskman import cgroups, host, private, users
from taskman.errors import NotExecutable
from taskman.manager import TaskManager
from taskman.task import JobStatus, Source


@pytest.fixture
def task_users(tmp_path):
    if os.geteuid() != 0:
        skip_needs_root("tasks change uid")
    return users.Users(users.Registry(str(tmp_path / "registry")), tmp_size=4 << 20)


def finished(mgr, owner, task_id, timeout=15):
    return poll_for(lambda: (lambda t: t if not t.running else None)(mgr.status(owner, task_id)),
                    timeout=timeout, message=f"task {task_id} to end")


def output(mgr, owner, task_id):
    with gevent.Timeout(30):
        return b"".join(mgr.stream(owner, task_id))


def test_tasks_run_as_their_owners_uid_recorded_in_the_store(state_dir, task_users):
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"), users=task_users)
    try:
        alice = mgr.start("alice", "id", ["-u"])
        bob = mgr.start("bob", "id", ["-u"])
        finished(mgr, "alice", alice.id), finished(mgr, "bob", bob.id)
        alice_uid, bob_uid = task_users.registry.uid_of("alice"), task_users.registry.uid_of("bob")
        assert output(mgr, "alice", alice.id) == f"{alice_uid}\n".encode()
        assert output(mgr, "bob", bob.id) == f"{bob_uid}\n".encode()
        assert alice_uid != bob_uid and 0 not in (alice_uid, bob_uid)
        assert mgr.store.users() == {"alice": alice_uid, "bob": bob_uid}
        processes = mgr.store.processes()
        assert processes[alice.id][0] == alice_uid and processes[bob.id][0] == bob_uid
        # The command is checked as the task's user: the state directory is not theirs.
        script = os.path.join(state_dir, "mine.sh")
        with open(script, "w") as file:
            file.write("#!/bin/sh\necho hi\n")
        os.chmod(script, 0o700)
        with pytest.raises(NotExecutable):
            mgr.start("alice", script)
    finally:
        mgr.shutdown(timeout=10)


def test_a_main_process_outside_its_groups_is_reported_and_still_stopped(state_dir):
    try:
        driver = cgroups.select_driver("auto", cgroups.Limits(), root=f"taskman-escape-{os.getpid()}")
    except Exception as error:  # noqa: BLE001 - the reason is printed
        pytest.skip(f"no cgroup driver on this host: {error}")
    mgr = TaskManager(state_dir, driver=driver, stop_grace=5)
    events = []
    mgr.listeners.append(lambda event, task: events.append((event, task.id)))
    try:
        # Unconfined (root, library use): the one kind of task that can move
        # itself, here into the driver's own root group, as an escape would.
        bases = [hierarchy.base for hierarchy in driver.hierarchies]
        script = "; ".join(f"echo $$ > {base}/cgroup.procs" for base in bases) + "; echo moved; exec sleep 300"
        task = mgr.start("alice", "sh", ["-c", script])
        poll_for(lambda: b"moved" in b"".join(mgr.stream("alice", task.id, follow=False)),
                 message="the task to leave its groups")
        stopped = mgr.stop("alice", task.id, wait=15)
        assert (stopped.status, stopped.signal, stopped.source) == \
            (JobStatus.SIGNALED, "SIGTERM", Source.USER)
        assert ("escaped", task.id) in events
        assert not process_running(task.pid)
    finally:
        mgr.shutdown(timeout=10)


def test_recovery_finds_a_leftover_by_start_time_not_environment(state_dir, task_users):
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"), users=task_users)
    task = mgr.start("alice", "sh", ["-c", "exec env -i sleep 300"])
    poll_for(lambda: open(f"/proc/{task.pid}/cmdline", "rb").read().startswith(b"sleep"),
             message="the task to exec sleep")
    assert b"TASKMAN_TASK_ID" not in open(f"/proc/{task.pid}/environ", "rb").read()
    identity = mgr.store.processes()[task.id][1]
    assert identity == host.start_identity(task.pid)
    # A crash: the records stay STARTED and the process runs on, unwatched.
    mgr._pruner.kill()
    mgr.store.close()
    again = TaskManager(state_dir, driver=cgroups.select_driver("none"), users=task_users)
    try:
        poll_for(lambda: not process_running(task.pid), message="the leftover to be killed")
        ended = again.status("alice", task.id)
        assert (ended.status, ended.signal, ended.source) == (JobStatus.SIGNALED, "SIGKILL", Source.SERVER)
    finally:
        again.shutdown(timeout=10)
        if process_running(task.pid):
            os.kill(task.pid, signal.SIGKILL)


def test_the_state_directory_is_closed_to_tasks(tmp_path):
    state = tmp_path / "state"
    (state / "output").mkdir(parents=True)
    state.chmod(0o755)
    (state / "output" / "x.log").write_text("secret")
    (state / "output" / "x.log").chmod(0o644)
    (state / "ca.crt").write_text("public")
    (state / "ca.crt").chmod(0o666)
    assert len(private.problems([str(state)])) == 4  # state, output (0755), x.log, ca.crt
    assert private.close_to_tasks([str(state)]) == 4
    assert private.problems([str(state)]) == []
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "output" / "x.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "ca.crt").stat().st_mode) == 0o644
