"""The cgroup v2 driver for real, on a pure cgroup v2 kernel (the VM of
vm/run-in-cgroupv2-vm; `tox -e cgroupv2`), through the project's own code:
``select_driver("auto")`` must pick v2 there, and the real TaskManager runs
real processes under the limits.

Each test runs as a fresh "service" (see conftest.py): pytest alone in a new
cgroup, like the server in its systemd unit, so the driver's own start-up
(moving itself into a leaf, enabling controllers) is what is tested. State
directories live on the VM's disk /dev/vda (254:0), so the IO limit applies
to a real device chosen by the driver from the state directory.

TCG makes the guest several times slower than the host: sizes are small and
timing bands generous.
"""

import os
import subprocess
import sys
import time

import gevent
import guest
import pytest

from support import poll_for, processes_of, timed_direct_io

guest.require_pure_v2(__name__)

from taskman import cgroups
from taskman.cgroups import Limits, cgroupfs, detect
from taskman.cgroups.v2 import SERVER_LEAF, V2Driver
from taskman.manager import TaskManager
from taskman.output import log_path
from taskman.task import JobStatus, Source

PY = sys.executable
MiB = 1 << 20
ROOT = "taskman"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def run(service, state_dir):
    """make(limits, stop_grace) -> a TaskManager with the auto-selected driver,
    started in this test's service group. Afterwards: shut down, and no task
    group may be left (only the server's own leaf)."""
    made = []

    def make(limits=None, stop_grace=1.0):
        driver = cgroups.select_driver("auto", limits or Limits(), root=ROOT,
                                       io_paths=(state_dir,))
        manager = TaskManager(os.path.join(state_dir, f"manager{len(made)}"), driver=driver,
                              stop_grace=stop_grace)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown(timeout=30)
        base = manager.driver.hierarchies[0].base
        assert cgroupfs.subgroups(base) == [SERVER_LEAF], "task groups left after shutdown"


def group_of(manager, task_id):
    return guest.task_group(manager.driver.hierarchies[0].base, task_id)


def wait_ended(manager, task_id, timeout=60):
    return poll_for(lambda: (lambda task: None if task.running else task)(
        manager.status("alice", task_id)), timeout=timeout, message=f"task {task_id} to end")


def output_of(manager, task_id):
    with gevent.Timeout(60):
        return b"".join(manager.stream("alice", task_id)).decode()


def output_so_far(manager, task_id):
    """The complete lines the task wrote so far (read without following)."""
    with open(log_path(manager.output_dir, task_id), "rb") as output:
        text = output.read().decode()
    return text.strip() if text.endswith("\n") else ""


def session_of(pid):
    try:
        return int(guest.read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[3])
    except OSError:
        return 0


# -- start-up: the driver, its place, its device


def test_auto_picks_v2_and_the_server_moves_into_a_leaf(run, service, state_dir):
    manager = run()
    driver = manager.driver
    print(driver.describe())
    assert isinstance(driver, V2Driver) and driver.name == "v2"
    # The server left its service group for a leaf, so that group and the
    # driver's base can hand the controllers to task groups.
    service_rel = service[len(guest.CG_ROOT):]
    assert guest.relative_cgroup() == f"{service_rel}/{ROOT}/{SERVER_LEAF}"
    assert driver.server_leaf == f"{service}/{ROOT}/{SERVER_LEAF}"
    assert guest.procs(service) == []
    for directory in (service, f"{service}/{ROOT}"):
        enabled = set(guest.read(f"{directory}/cgroup.subtree_control").split())
        assert set(guest.NEEDED) <= enabled, (directory, enabled)
    # IO limits go to the disk holding the state directory: the VM's vda.
    assert driver.devices == detect.backing_devices([state_dir])
    if guest.IN_VM:
        assert driver.devices == ("254:0",)


def test_a_task_group_gets_the_limit_files(run, state_dir):
    manager = run()  # the RFD's defaults
    task = manager.start("alice", "sleep", ["1000"])
    group = group_of(manager, task.id)
    # The gate writes itself into its groups before it can run the command,
    # and start() does not wait for that (taskman.process.spawn): poll.
    poll_for(lambda: guest.relative_cgroup(task.pid) == group[len(guest.CG_ROOT):], timeout=10,
             message="the task in its group")
    assert guest.read(f"{group}/cpu.max").split() == ["200000", "1000000"]
    assert int(guest.read(f"{group}/memory.max")) == 512 * MiB
    if os.path.exists(f"{group}/memory.swap.max"):
        assert guest.read(f"{group}/memory.swap.max").strip() == "0"
    assert guest.read(f"{group}/pids.max").strip() == "1024"
    io_max = guest.read(f"{group}/io.max")
    print("io.max:", io_max.strip())
    device = detect.backing_devices([state_dir])[0]
    assert f"{device} rbps={256 * MiB} wbps={256 * MiB} riops=max wiops=max" in io_max
    manager.stop("alice", task.id)
    assert not os.path.exists(group)


# -- limits


def test_memory_limit_ends_in_oom_kill_read_from_memory_events(run, monkeypatch):
    manager = run(Limits(memory_max=32 * MiB))
    driver = manager.driver
    events = []
    oom_killed = driver.oom_killed

    def spy(group):  # what the driver decides from, read just before it does
        events.append(cgroupfs.keyed(os.path.join(group.directories["unified"],
                                                  "memory.events")))
        return oom_killed(group)

    monkeypatch.setattr(driver, "oom_killed", spy)
    task = manager.start("alice", PY, ["-c", "data = b'x' * (128 << 20); print('survived')"])
    ended = wait_ended(manager, task.id)
    print("memory.events at the end:", events)
    assert (ended.status, ended.signal, ended.source) == (JobStatus.SIGNALED, "SIGKILL",
                                                          Source.OOM)
    assert events and events[-1]["oom_kill"] >= 1
    assert "survived" not in output_of(manager, task.id)


def test_memory_under_the_limit_is_fine(run):
    manager = run(Limits(memory_max=64 * MiB))
    task = manager.start("alice", PY, ["-c", "data = b'x' * (16 << 20)"])
    ended = wait_ended(manager, task.id)
    assert (ended.status, ended.source) == (JobStatus.EXITED_OK, Source.NONE)


def test_cpu_max_holds_a_busy_loop_near_20_percent(run):
    manager = run()  # cpu.max "200000 1000000": 20% of one CPU
    task = manager.start("alice", "sh", ["-c", "while :; do :; done"])
    stat_file = os.path.join(group_of(manager, task.id), "cpu.stat")
    gevent.sleep(1.5)  # past the start-up and the first period
    before, started = cgroupfs.keyed(stat_file), time.monotonic()
    gevent.sleep(5.0)  # five 1 s periods
    after, took = cgroupfs.keyed(stat_file), time.monotonic() - started
    manager.stop("alice", task.id)
    share = (after["usage_usec"] - before["usage_usec"]) / 1e6 / took
    throttled = after["nr_throttled"] - before["nr_throttled"]
    print(f"busy loop under cpu.max 200000 1000000: {share:.1%} of a CPU over {took:.1f}s, "
          f"throttled in {throttled} periods")
    assert 0.10 <= share <= 0.35
    assert throttled >= 3


def test_io_max_throttles_direct_io_on_the_state_disk(run, state_dir, monkeypatch):
    if not detect.backing_devices([state_dir]):
        pytest.skip(f"{state_dir} is on no block device")
    manager = run(Limits(io_read_bps=1 * MiB, io_write_bps=1 * MiB))
    driver = manager.driver
    assert driver.devices == detect.backing_devices([state_dir])
    stats = {}
    remove_groups = driver.remove_groups  # a task's own groups (its slice may linger)

    def spy(group):  # the group's io.stat, read just before it goes
        stats[group.task_id] = cgroupfs.read(os.path.join(group.directories["unified"],
                                                          "io.stat"))
        return remove_groups(group)

    monkeypatch.setattr(driver, "remove_groups", spy)
    size = 3
    durations, tasks = {}, {}
    for name, (task, ended, seconds) in timed_direct_io(manager, state_dir, size, 60).items():
        durations[name], tasks[name] = seconds, task
        assert ended.status == JobStatus.EXITED_OK, output_of(manager, task.id)
        print(f"direct {name} of {size} MiB at 1 MiB/s on {driver.devices[0]}: "
              f"{durations[name]:.2f}s; dd: {output_of(manager, task.id).splitlines()[-1]}; "
              f"io.stat: {stats.get(task.id, '').strip()}")
    device = driver.devices[0]
    read_stat = dict(f.split("=") for f in stats[tasks["read"].id].split(device, 1)[1].split()[:4])
    write_stat = dict(f.split("=") for f in stats[tasks["write"].id].split(device, 1)[1].split()[:4])
    assert int(read_stat["rbytes"]) >= size * MiB
    assert int(write_stat["wbytes"]) >= size * MiB
    # 3 MiB at 1 MiB/s: about 2-3 s each (unthrottled: a few ms).
    assert durations["read"] >= 1.5 and durations["write"] >= 1.5


def test_pids_max_holds_a_fork_loop(run):
    manager = run(Limits(pids_max=8))
    # At most 30 forks whatever happens: a broken limit cannot bomb the guest.
    program = ("import os, time\nmade = 0\nfor _ in range(30):\n"
               "    try:\n        pid = os.fork()\n    except OSError:\n        continue\n"
               "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
               "    made += 1\nprint(made, flush=True)\ntime.sleep(60)")
    task = manager.start("alice", PY, ["-c", program])
    made = int(poll_for(lambda: output_so_far(manager, task.id), timeout=60,
                        message="the fork count"))
    group = group_of(manager, task.id)
    events = cgroupfs.keyed(f"{group}/pids.events")
    current = int(guest.read(f"{group}/pids.current"))
    print(f"pids.max 8: {made} forks made, pids.current {current}, pids.events {events}")
    assert made == 7  # 8 processes: the forker and 7 children
    assert current == 8 and events["max"] >= 1
    manager.stop("alice", task.id)
    assert not processes_of(task.id)


# -- stopping, leftovers, groups


def test_stop_empties_the_tree_with_cgroup_kill(run, monkeypatch):
    manager = run(stop_grace=0.5)
    writes = []
    write = cgroupfs.write

    def spy(path, value):
        writes.append((path, value))
        write(path, value)

    monkeypatch.setattr(cgroupfs, "write", spy)
    # Everything ignores SIGTERM, one sleep is in a session of its own, one a
    # grandchild: only killing the whole group gets them all.
    task = manager.start("alice", "sh", ["-c", "trap '' TERM; sleep 1000 & setsid sleep 1000 & "
                                               "sh -c 'sleep 1000; :' & wait"])

    def tree_with_two_sessions():  # setsid has run: one sleep left the task's session
        found = processes_of(task.id)
        return found if len(found) == 5 and len(set(map(session_of, found))) == 2 else None

    tree = poll_for(tree_with_two_sessions, timeout=30,
                    message="the 5 processes of the tree, in 2 sessions")
    group = group_of(manager, task.id)
    assert sorted(guest.procs(group)) == sorted(tree)
    started = time.monotonic()
    stopped = manager.stop("alice", task.id)
    took = time.monotonic() - started
    print(f"stop, TERM ignored, 0.5 s grace: {took * 1000:.0f} ms")
    assert (stopped.status, stopped.signal, stopped.source) == (JobStatus.SIGNALED, "SIGKILL",
                                                                Source.USER)
    assert (f"{group}/cgroup.kill", "1") in writes
    assert not processes_of(task.id)
    assert not os.path.exists(group)
    assert took < 10


def test_leftovers_die_with_the_main_process_and_no_group_remains(run):
    manager = run()
    task = manager.start("alice", "sh", ["-c", "setsid sleep 1000 & echo started"])
    ended = wait_ended(manager, task.id)
    assert (ended.status, ended.exit_code) == (JobStatus.EXITED_OK, 0)
    assert output_of(manager, task.id) == "started\n"
    assert not processes_of(task.id)
    base = manager.driver.hierarchies[0].base
    poll_for(lambda: cgroupfs.subgroups(base) == [SERVER_LEAF], timeout=10,
             message="only the server's leaf to be left")


EARLIER_SERVER = """
import sys
from gevent import monkey
monkey.patch_all()
import gevent
from taskman import cgroups
from taskman.manager import TaskManager
state_dir = sys.argv[1]
driver = cgroups.select_driver("auto", cgroups.Limits(), root="taskman", io_paths=(state_dir,))
manager = TaskManager(state_dir, driver=driver)
task = manager.start("alice", "sh", ["-c", "setsid sleep 1000 & sleep 1000 & wait"])
print(task.id, flush=True)
gevent.sleep(1000)
"""


def test_stale_groups_of_an_earlier_run_are_removed_at_start(delegated, service, state_dir):
    # The earlier run: a real server process alone in this service group,
    # which starts a task and then dies by SIGKILL, leaving the task running.
    guest.move_self(delegated[1])
    earlier = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', service,
         PY, "-c", EARLIER_SERVER, state_dir],
        stdout=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(120):
            task_id = earlier.stdout.readline().strip()
        stale = guest.task_group(f"{service}/{ROOT}", task_id)
        left = poll_for(lambda: (lambda found: found if len(found) == 3 else None)(
            processes_of(task_id)), timeout=30, message="the earlier task's 3 processes")
        assert sorted(guest.procs(stale)) == sorted(left)
    finally:
        earlier.kill()
        earlier.wait()
    assert processes_of(task_id)  # the task outlived its server
    # The restarted server starts where its predecessor lived: the service
    # group itself cannot take a process any more (its controllers are
    # enabled), its leaf can.
    guest.move_self(f"{service}/{ROOT}/{SERVER_LEAF}")
    manager = TaskManager(state_dir, driver=cgroups.select_driver(
        "auto", Limits(), root=ROOT, io_paths=(state_dir,)))
    try:
        assert manager.driver.hierarchies[0].base == f"{service}/{ROOT}"
        assert not processes_of(task_id)
        assert not os.path.exists(stale)
        assert cgroupfs.subgroups(f"{service}/{ROOT}") == [SERVER_LEAF]
        assert guest.relative_cgroup() == f"{service[len(guest.CG_ROOT):]}/{ROOT}/{SERVER_LEAF}"
        recovered = manager.status("alice", task_id)
        assert (recovered.status, recovered.source) == (JobStatus.SIGNALED, Source.SERVER)
    finally:
        manager.shutdown(timeout=30)
