"""Per-user slices on the host's real cgroups (hybrid here, v2 on a pure v2
host): a user's tasks share one slice whose limits are in the cgroup files,
a slice's memory limit OOM-kills one of two tasks that fit alone, the
start-up clean-up reaches into slices, and no user name can collide.

Until the manager passes the owner itself, the tests wrap the driver's
``create`` so that every task of the manager goes into one owner's slice.
Needs root and cgroups; skips with the reason otherwise.
"""

import dataclasses
import itertools
import logging
import os
import signal
import subprocess
import uuid

import pytest

from support import poll_for
from taskman import cgroups
from taskman.cgroups import Limits, cgroupfs, slices
from taskman.cgroups.slices import Owner, SliceLimits
from taskman.errors import CgroupError, InvalidArgument
from taskman.manager import TaskManager
from taskman.task import JobStatus, Source

MiB = 1 << 20
# Not sys.executable: a virtualenv's python may sit on another file system;
# the host's python is what a task would run.
HOST_PYTHON = "/usr/bin/python3"
ALICE = Owner("alice", 70001)
_names = itertools.count()

pytestmark = pytest.mark.timeout(60)


def root_name():
    return f"taskman-test-slices-{os.getpid()}-{next(_names)}"


def select_or_skip(limits=None, slice_limits=None, root=None, io_paths=("/",)):
    if os.geteuid() != 0:
        pytest.skip(f"needs root: cgroups are managed by root (uid {os.geteuid()})")
    try:
        return cgroups.select_driver("auto", limits or Limits(), root=root or root_name(),
                                     io_paths=io_paths, slice_limits=slice_limits)
    except CgroupError as error:
        pytest.skip(f"no cgroup driver on this host: {error}")


def owned_by(driver, owner):
    """Make every group the driver creates go into ``owner``'s slice; keep
    them, by task id, in ``driver.made``."""
    create = driver.create
    forced = owner
    driver.made = {}

    def create_owned(task_id, owner=owner):  # the manager's owner, overridden by ours
        group = driver.made[task_id] = create(task_id, owner=forced)
        return group
    driver.create = create_owned
    return driver


def everything_under(driver):
    return {hierarchy.base: list(cgroupfs.walk(hierarchy.base))[1:]
            for hierarchy in driver.hierarchies if list(cgroupfs.walk(hierarchy.base))[1:]}


def remove_everything(driver):
    for hierarchy in driver.hierarchies:  # never leak into the host, even on failure
        for name in cgroupfs.subgroups(hierarchy.base):
            cgroupfs.remove_directory(os.path.join(hierarchy.base, name))
        cgroupfs.remove_if_unused(hierarchy.base)


@pytest.fixture
def run(state_dir):
    """Managers on the real driver, every task in ALICE's slice; at the end
    nothing may be left, neither task groups nor slices nor bases."""
    made = []

    def make(limits=None, slice_limits=None, owner=ALICE):
        driver = owned_by(select_or_skip(limits, slice_limits, io_paths=(state_dir,)), owner)
        manager = TaskManager(os.path.join(state_dir, str(len(made))), driver=driver,
                              stop_grace=1.0)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown(timeout=15)
        left = everything_under(manager.driver)
        remove_everything(manager.driver)
        assert not left, f"groups left after shutdown: {left}"
        assert not [h.base for h in manager.driver.hierarchies if os.path.exists(h.base)]


def wait_ended(manager, task_id, timeout=30):
    return poll_for(lambda: (lambda task: None if task.running else task)(
        manager.status("alice", task_id)), timeout=timeout, message=f"task {task_id} to end")


def hierarchy_with(driver, file):
    for hierarchy in driver.hierarchies:
        if cgroupfs.exists(os.path.join(hierarchy.base, file)):
            return hierarchy
    pytest.skip(f"no hierarchy of the {driver.name} driver has {file}")


def read(directory, file):
    return cgroupfs.read(os.path.join(directory, file)).strip()


# -- real groups


def test_every_task_together_weighs_less_than_the_server(run):
    """The tasks' CPU weight is in the files that compete with the server:
    the root's cpu.shares on v1 (the server is its parent or an autogroup
    beside it), each slice's cpu.weight on v2 (the server's leaf is a sibling)."""
    defaults = slices.default_slice_limits()
    manager = run(slice_limits=SliceLimits(user=defaults.user, root=defaults.root,
                                           cpu_weight=25))
    driver = manager.driver
    manager.start("alice", "sleep", ["1000"])
    if driver.name == "hybrid":
        cpu = hierarchy_with(driver, "cpu.shares").base
        assert read(cpu, "cpu.shares") == "256"
        assert read(f"{cpu}/user-70001", "cpu.shares") == "1024"  # users stay equals
    else:
        base = driver.hierarchies[0].base
        assert read(f"{base}/user-70001", "cpu.weight") == "25"
        assert read(base, "cpu.weight") == "25"


def test_the_cpu_weight_is_checked_and_mapped_like_systemds():
    defaults = slices.default_slice_limits()
    assert defaults.cpu_weight == slices.TASKS_CPU_WEIGHT == 10
    assert [slices.v1_shares(weight) for weight in (1, 10, 100, 10000)] == [10, 102, 1024, 102400]
    for bad in (-1, 10001, True, 1.5):
        with pytest.raises(InvalidArgument, match="--tasks-cpu-weight"):
            SliceLimits(user=defaults.user, root=defaults.root, cpu_weight=bad)
    assert SliceLimits(user=defaults.user, root=defaults.root, cpu_weight=0).cpu_weight == 0


def test_a_users_two_tasks_share_one_slice_whose_limits_are_in_the_files(run):
    user = Limits(cpu_quota_us=500_000, cpu_period_us=1_000_000, memory_max=768 * MiB,
                  io_read_bps=100 * MiB, io_write_bps=0, pids_max=300)
    root = Limits(cpu_quota_us=1_500_000, cpu_period_us=1_000_000, memory_max=2048 * MiB,
                  io_read_bps=0, io_write_bps=0, pids_max=5000)
    manager = run(slice_limits=SliceLimits(user=user, root=root))
    driver = manager.driver
    first = manager.start("alice", "sleep", ["1000"])
    second = manager.start("alice", "sleep", ["1000"])
    groups = [driver.made[task.id] for task in (first, second)]
    for hierarchy in driver.hierarchies:
        slice_directory = os.path.join(hierarchy.base, "user-70001")
        assert [os.path.dirname(group.directories[hierarchy.name]) for group in groups] == \
            [slice_directory, slice_directory]
        assert sorted(cgroupfs.subgroups(slice_directory)) == sorted([first.id, second.id])

    if driver.name == "hybrid":
        memory = hierarchy_with(driver, "memory.limit_in_bytes").base
        assert read(f"{memory}/user-70001", "memory.limit_in_bytes") == str(768 * MiB)
        assert read(memory, "memory.limit_in_bytes") == str(2048 * MiB)
        assert read(f"{memory}/user-70001", "memory.use_hierarchy") == "1"
        cpu = hierarchy_with(driver, "cpu.cfs_quota_us").base
        assert read(f"{cpu}/user-70001", "cpu.cfs_quota_us") == "500000"
        assert read(cpu, "cpu.cfs_quota_us") == "1500000"
        # The task's own limit is still there, beneath the slice's.
        assert read(groups[0].directories[_named(driver, "cpu")], "cpu.cfs_quota_us") == "200000"
        pids = hierarchy_with(driver, "pids.max").base
        assert read(f"{pids}/user-70001", "pids.max") == "300"
        assert read(pids, "pids.max") == "5000"
        blkio = hierarchy_with(driver, "blkio.throttle.read_bps_device").base
        assert read(f"{blkio}/user-70001", "blkio.throttle.read_bps_device") == \
            "\n".join(f"{device} {100 * MiB}" for device in driver.devices)
    else:
        base = driver.hierarchies[0].base
        assert read(f"{base}/user-70001", "memory.max") == str(768 * MiB)
        assert read(base, "memory.max") == str(2048 * MiB)
        assert read(f"{base}/user-70001", "cpu.max") == "500000 1000000"
        assert read(f"{base}/user-70001", "pids.max") == "300"
        assert set(read(f"{base}/user-70001", "cgroup.subtree_control").split()) >= \
            {"cpu", "memory", "io", "pids"}

    # The slice stays while one task is in it, and goes with the last.
    manager.stop("alice", first.id)
    wait_ended(manager, first.id)
    poll_for(lambda: all(cgroupfs.subgroups(os.path.join(h.base, "user-70001")) == [second.id]
                         for h in driver.hierarchies), message="the first task's groups to go")
    manager.stop("alice", second.id)
    wait_ended(manager, second.id)
    poll_for(lambda: not everything_under(driver), message="the slice to go with its last task")


def _named(driver, controller):
    return next(hierarchy.name for hierarchy in driver.hierarchies
                if controller in hierarchy.name.split(","))


def test_a_slice_memory_limit_oom_kills_one_of_two_tasks_that_fit_alone(run):
    """512 MiB for the user, 1 GiB per task: two tasks of 400 MiB each fit
    their own limits but not the user's; the kernel kills one, and it is
    reported ``oom`` (the kill is counted in the victim's own group), the
    other ends normally."""
    if not os.path.exists(HOST_PYTHON):
        pytest.skip(f"{HOST_PYTHON} is missing")
    user = dataclasses.replace(slices.unlimited(), memory_max=512 * MiB)
    manager = run(Limits(memory_max=1024 * MiB),
                  SliceLimits(user=user, root=slices.default_slice_limits().root))
    hog = "b = bytearray(400 << 20); import time; time.sleep(4)"
    tasks = [manager.start("alice", HOST_PYTHON, ["-c", hog]) for _ in range(2)]
    ended = sorted((wait_ended(manager, task.id) for task in tasks),
                   key=lambda task: task.status.value)
    outcomes = sorted((task.status, task.signal, task.source) for task in ended)
    assert outcomes == sorted([(JobStatus.EXITED_OK, "", Source.NONE),
                               (JobStatus.SIGNALED, "SIGKILL", Source.OOM)]), outcomes


def test_stale_groups_in_slices_are_removed_at_setup_and_nothing_else(state_dir, caplog):
    caplog.set_level(logging.INFO, logger="taskman.cgroups")
    root = root_name()
    driver = select_or_skip(root=root)
    stale_id, flat_id = str(uuid.uuid4()), str(uuid.uuid4())
    stray = subprocess.Popen(["sleep", "1000"])
    first = driver.hierarchies[0].base
    foreign_in_slice = os.path.join(first, "user-70002", "not-a-task")
    not_a_slice = os.path.join(first, "user-abc")
    try:
        for hierarchy in driver.hierarchies:
            for path in (f"user-70001/{stale_id}", f"user-name-bob/{flat_id}", "user-70002"):
                os.makedirs(os.path.join(hierarchy.base, path))
            cgroupfs.write(os.path.join(hierarchy.base, "user-70001", stale_id, "cgroup.procs"),
                           str(stray.pid))
        os.mkdir(foreign_in_slice)
        os.mkdir(not_a_slice)
        manager = TaskManager(state_dir, driver=driver)  # its setup() cleans up
        try:
            assert stray.wait(timeout=5) == -signal.SIGKILL
            for hierarchy in driver.hierarchies:
                assert sorted(cgroupfs.subgroups(hierarchy.base)) == (
                    ["user-70002", "user-abc"] if hierarchy.base == first else [])
            assert os.path.isdir(foreign_in_slice) and os.path.isdir(not_a_slice)
            assert f"removed task group {stale_id} left by an earlier run" in caplog.text
            assert f"removed task group {flat_id} left by an earlier run" in caplog.text
            assert f"leaving {foreign_in_slice} alone: not a task group" in caplog.text
            assert f"leaving {not_a_slice} alone: not a task group" in caplog.text
        finally:
            manager.shutdown(timeout=15)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
        remove_everything(driver)
    assert not [h.base for h in driver.hierarchies if os.path.exists(h.base)]


@pytest.mark.parametrize("identity", ["cgroup.procs", "memory.max", "tasks", "user-70001",
                                      "name-x", "a_b/c", "..", str(uuid.uuid4())])
def test_no_user_name_can_collide_with_a_control_file_a_task_or_another_user(identity):
    driver = select_or_skip()
    driver.setup()
    try:
        groups = [driver.create(str(uuid.uuid4()), owner=Owner(identity)),
                  driver.create(str(uuid.uuid4()), owner=Owner(identity, 70001)),
                  driver.create(str(uuid.uuid4()), owner=Owner("x" + identity))]
        names = [group.slice_name for group in groups]
        assert len(set(names)) == 3 and all(slices.is_slice_name(name) for name in names)
        for hierarchy in driver.hierarchies:
            entries = os.listdir(hierarchy.base)
            # Each slice is a directory of its own beside the control files.
            assert all(os.path.isdir(os.path.join(hierarchy.base, name)) for name in names)
            assert sorted(set(entries) & set(names)) == sorted(names)
        for group in groups:
            driver.remove(group)
        assert not everything_under(driver)
    finally:
        remove_everything(driver)
        driver.close()


# -- names and defaults, no cgroups needed


def test_slice_names():
    assert slices.slice_name("client001", 70001) == "user-70001"
    assert slices.slice_name("client001") == "user-name-client001"
    assert slices.slice_name("a_b/c d") == "user-name-a_5fb_2fc_20d"
    assert slices.slice_name("é") == "user-name-_c3_a9"
    assert slices.slice_name(str(uuid.UUID(int=0))).startswith("user-name-")
    for name in ("user-70001", "user-name-client001", "user-name-a_5fb"):
        assert slices.is_slice_name(name)
    for name in ("user-", "user-abc", "user-name-", "user-name-a_b", "user-name-a/b",
                 "cgroup.procs", str(uuid.uuid4()), "server"):
        assert not slices.is_slice_name(name)
    with pytest.raises(CgroupError, match="too long"):
        slices.slice_name("_" * 100)
    with pytest.raises(CgroupError):
        slices.slice_name("")


def test_default_slice_limits_keep_a_reserve(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8388608 kB\nMemFree: 1 kB\n")  # 8 GiB
    pid_max = tmp_path / "pid_max"
    pid_max.write_text("32768\n")
    defaults = slices.default_slice_limits(str(meminfo), str(pid_max))
    assert defaults.root.memory_max == 7 << 30  # 8 GiB less 1 GiB (10% is less)
    assert defaults.user.memory_max == 7 << 29
    assert defaults.root.pids_max == 32768 - 8192
    assert defaults.user.pids_max == 8192
    assert defaults.root.cpu_quota_us == defaults.user.cpu_quota_us == 0


def test_cpu_quotas_that_v1_would_refuse_are_start_up_errors():
    task = Limits(cpu_quota_us=200_000, cpu_period_us=1_000_000)
    fits = SliceLimits(user=Limits(cpu_quota_us=50_000, cpu_period_us=100_000),
                       root=slices.unlimited())
    slices.check_cpu_nesting(task, fits)
    too_small = SliceLimits(user=Limits(cpu_quota_us=100_000, cpu_period_us=1_000_000),
                            root=slices.unlimited())
    with pytest.raises(InvalidArgument, match="--cpu-quota-us 200000 .* --user-cpu-quota-us"):
        slices.check_cpu_nesting(task, too_small)
    root_below_user = SliceLimits(user=Limits(cpu_quota_us=500_000),
                                  root=Limits(cpu_quota_us=300_000))
    with pytest.raises(InvalidArgument, match="--user-cpu-quota-us .* --root-cpu-quota-us"):
        slices.check_cpu_nesting(task, root_below_user)
