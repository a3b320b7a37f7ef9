"""The v2 driver: for real on whatever cgroup2 mount this host has (on a
hybrid host it offers no controllers, so only tracking and killing), and its
limit files, delegation and detection against a FAKE cgroup tree.

The fake is a tmp directory laid out like /sys/fs/cgroup; a "kernel" stand-in
fills each new group with its interface files. Because cgroupfs appends,
every file the driver wrote keeps each value, in order.
"""

import itertools
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from support import poll_for
from taskman import cgroups
from taskman.cgroups import Limits, cgroupfs, detect, slices
from taskman.cgroups.v2 import SERVER_LEAF, V2Driver
from taskman.errors import CgroupError, InvalidArgument
from taskman.manager import TaskManager
from taskman.task import JobStatus, Source

pytestmark = pytest.mark.timeout(60)
_names = itertools.count()


# -- for real, tracking only


@pytest.fixture
def tracking_manager(state_dir):
    if os.geteuid() != 0:
        pytest.skip(f"needs root: cgroup2 groups are created by root (uid {os.geteuid()})")
    host = detect.host()
    if not host.v2_mount:
        pytest.skip("no cgroup2 mount on this host")
    root = f"taskman-test-v2-{os.getpid()}-{next(_names)}"
    driver = V2Driver(None, root, mount=host.v2_mount, own=host.v2_own)
    manager = TaskManager(state_dir, driver=driver, stop_grace=0)
    yield manager
    manager.shutdown(timeout=15)
    base = driver.hierarchies[0].base
    left = cgroupfs.subgroups(base) if os.path.isdir(base) else []
    for name in left:
        cgroupfs.remove_directory(os.path.join(base, name))
    cgroupfs.remove_if_unused(base)
    assert not left and not os.path.exists(base)


def _live(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_tracking_group_kills_a_setsid_tree(tracking_manager):
    manager = tracking_manager
    task = manager.start("alice", "sh", ["-c", "sleep 1000 & setsid sleep 1000 & wait"])
    group = manager._tasks[task.id].group
    directory = group.directories["unified"]
    pids = poll_for(lambda: (lambda found: found if len(found) == 3 else None)(
        cgroupfs.pids([directory])), message="three processes in the group")
    assert cgroupfs.keyed(os.path.join(directory, "cgroup.events"))["populated"] == 1
    started = time.monotonic()
    stopped = manager.stop("alice", task.id)
    print(f"cgroup.kill stop of a 3-process tree: {(time.monotonic() - started) * 1000:.1f} ms")
    assert (stopped.status, stopped.signal, stopped.source) == (JobStatus.SIGNALED, "SIGKILL",
                                                                Source.USER)
    assert not [pid for pid in pids if _live(pid)]
    poll_for(lambda: not os.path.exists(directory), message="the group to be removed")


def test_tracking_group_ends_leftovers_of_the_main_process(tracking_manager):
    manager = tracking_manager
    task = manager.start("alice", "sh", ["-c", "setsid sleep 1000 & echo $!"])
    ended = poll_for(lambda: (lambda t: None if t.running else t)(manager.status("alice", task.id)),
                     message="the task to end")
    assert ended.status == JobStatus.EXITED_OK
    leftover = int(b"".join(manager.stream("alice", task.id)))
    poll_for(lambda: not _live(leftover), message="the setsid sleep to die")


def test_tracking_driver_removes_stale_groups_of_an_earlier_run(state_dir):
    host = detect.host()
    if os.geteuid() != 0 or not host.v2_mount:
        pytest.skip("needs root and a cgroup2 mount")
    root = f"taskman-test-v2-{os.getpid()}-{next(_names)}"
    driver = V2Driver(None, root, mount=host.v2_mount, own=host.v2_own)
    stale = os.path.join(driver.hierarchies[0].base, str(uuid.uuid4()))
    os.makedirs(stale)
    stray = subprocess.Popen(["sleep", "1000"])
    try:
        cgroupfs.write(os.path.join(stale, "cgroup.procs"), str(stray.pid))
        assert driver.setup() == 1
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert not os.path.exists(stale)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
        driver.close()
        if os.path.exists(stale):
            cgroupfs.remove_directory(stale)
    assert not os.path.exists(driver.hierarchies[0].base)


# -- against a fake tree


INTERFACE = {"cgroup.procs": "", "cgroup.kill": "", "cgroup.freeze": "",
             "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.subtree_control": "",
             "cgroup.controllers": "cpu io memory pids\n", "cpu.max": "", "cpu.weight": "",
             "memory.max": "", "memory.swap.max": "", "memory.events": "oom_kill 0\n",
             "io.max": "", "pids.max": ""}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake cgroup2 mount whose "kernel" fills new groups with interface files."""
    mount = tmp_path / "cgroup"
    real_make = cgroupfs.make_directory

    def make_directory(path, **options):
        made = real_make(path, **options)
        if made:
            for name, text in INTERFACE.items():
                with open(os.path.join(path, name), "w") as interface_file:
                    interface_file.write(text)
        return made

    monkeypatch.setattr(cgroupfs, "make_directory", make_directory)
    monkeypatch.setattr(cgroupfs, "remove_directory", lambda path: shutil.rmtree(path, True))
    monkeypatch.setattr(cgroupfs, "remove_if_unused", lambda path: False)
    mount.mkdir()
    for name, text in INTERFACE.items():
        (mount / name).write_text(text)
    (mount / "svc").mkdir()
    for name, text in INTERFACE.items():
        (mount / "svc" / name).write_text(text)
    (mount / "svc" / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return mount


def _text(path):
    return open(path).read()


def test_fake_v2_setup_moves_the_server_into_a_leaf_then_delegates(fake):
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/svc")
    assert driver.setup() == 0
    try:
        base = fake / "svc" / "taskman"
        assert _text(base / SERVER_LEAF / "cgroup.procs") == str(os.getpid())
        assert _text(fake / "svc" / "cgroup.subtree_control") == "+cpu +memory +io +pids"
        assert _text(base / "cgroup.subtree_control") == "+cpu +memory +io +pids"
        assert "server moved into" in driver.describe()
    finally:
        driver.close()


def test_fake_v2_slices_and_root_weigh_less_than_the_servers_leaf(fake):
    """The server's leaf is the slices' sibling: each slice (and the root,
    for a server in the root cgroup) gets the tasks' weight, the leaf none."""
    limits = slices.default_slice_limits()
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/svc",
                      slice_limits=limits)
    driver.setup()
    try:
        base = fake / "svc" / "taskman"
        driver.create(str(uuid.uuid4()), owner=slices.Owner("alice", 70001))
        assert _text(base / "user-70001" / "cpu.weight") == str(slices.TASKS_CPU_WEIGHT)
        assert _text(base / "cpu.weight") == str(slices.TASKS_CPU_WEIGHT)
        assert _text(base / SERVER_LEAF / "cpu.weight") == ""
        assert "cpu weight 10 against the server's 100" in driver.describe()
    finally:
        driver.close()


def test_fake_v2_a_users_slice_is_made_when_missing_not_tried_at_each_group(fake, monkeypatch):
    """A task group's mkdir comes first: its slice is made (with its
    settings) only when that finds it missing, also if it went meanwhile."""
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/svc",
                      slice_limits=slices.default_slice_limits())
    driver.setup()
    made = []
    real_mkdir = os.mkdir
    monkeypatch.setattr(os, "mkdir", lambda path, *args: made.append(str(path)) or real_mkdir(path, *args))
    try:
        user_slice = fake / "svc" / "taskman" / "user-70001"
        owner = slices.Owner("alice", 70001)
        first, second, third = (str(uuid.uuid4()) for _ in range(3))
        driver.create(first, owner=owner)
        assert made == [str(user_slice / first), str(user_slice), str(user_slice / first)]
        made.clear()
        driver.create(second, owner=owner)
        assert made == [str(user_slice / second)]
        assert _text(user_slice / "cpu.weight") == str(slices.TASKS_CPU_WEIGHT)  # written once
        shutil.rmtree(user_slice)
        made.clear()
        driver.create(third, owner=owner)
        assert made == [str(user_slice / third), str(user_slice), str(user_slice / third)]
        assert _text(user_slice / "cpu.weight") == str(slices.TASKS_CPU_WEIGHT)
    finally:
        driver.close()


def test_fake_v2_an_optional_file_is_looked_for_once(fake, monkeypatch):
    """memory.swap.max (absent without swap accounting) is looked for at the
    first task group, not at every one: the kernel's options decide."""
    monkeypatch.delitem(INTERFACE, "memory.swap.max")
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/")
    driver.setup()
    looked = []
    real_exists = cgroupfs.exists
    monkeypatch.setattr(cgroupfs, "exists", lambda path: looked.append(os.path.basename(path))
                        or real_exists(path))
    try:
        for _ in range(3):
            directory = fake / "taskman" / driver.create(str(uuid.uuid4())).task_id
            assert not (directory / "memory.swap.max").exists()
            assert _text(directory / "memory.max") == str(Limits().memory_max)
        assert looked.count("memory.swap.max") == 1
    finally:
        driver.close()


def test_fake_v2_at_the_root_moves_nothing(fake):
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/")
    driver.setup()
    try:
        assert not (fake / "taskman" / SERVER_LEAF).exists()
        assert _text(fake / "cgroup.subtree_control") == "+cpu +memory +io +pids"
    finally:
        driver.close()


def test_fake_v2_refuses_when_other_processes_share_its_cgroup(fake, monkeypatch):
    (fake / "svc" / "cgroup.procs").write_text(f"{os.getpid()}\n4242\n")
    write = cgroupfs.write

    def kernel_write(path, value):  # the no-internal-processes rule
        if path.endswith("svc/cgroup.subtree_control"):
            raise CgroupError(f"cannot write {value!r} to {path}: Device or resource busy")
        write(path, value)

    monkeypatch.setattr(cgroupfs, "write", kernel_write)
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/svc")
    with pytest.raises(CgroupError, match="also holds processes 4242"):
        driver.setup()
    # The server went back where it was, and the directories it made are gone.
    assert _text(fake / "svc" / "cgroup.procs").endswith(str(os.getpid()))
    assert not (fake / "svc" / "taskman").exists()


def test_fake_v2_refuses_without_delegated_controllers(fake):
    (fake / "svc" / "cgroup.controllers").write_text("cpu memory\n")
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/svc")
    with pytest.raises(CgroupError, match="io, pids are not available"):
        driver.setup()


def test_fake_v2_limit_files_and_operations(fake):
    limits = Limits(cpu_quota_us=50_000, cpu_period_us=100_000, memory_max=64 << 20,
                    io_read_bps=10 << 20, io_write_bps=0, pids_max=20)
    driver = V2Driver(limits, "taskman", ("254:0", "253:0"), mount=str(fake), own="/")
    driver.setup()
    task_id = str(uuid.uuid4())
    group = driver.create(task_id)
    directory = fake / "taskman" / task_id
    assert group.directories == {"unified": str(directory)}
    assert _text(directory / "cpu.max") == "50000 100000"
    assert _text(directory / "memory.max") == str(64 << 20)
    assert _text(directory / "memory.swap.max") == "0"
    assert _text(directory / "pids.max") == "20"
    # One write per device: the kernel takes one "MAJ:MIN key=value..." per write.
    assert _text(directory / "io.max") == ("254:0 rbps=10485760 wbps=max"
                                           "253:0 rbps=10485760 wbps=max")

    driver.place(group, 4242)
    assert _text(directory / "cgroup.procs") == "4242" and group.pid == 4242
    (directory / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert not driver.is_empty(group)
    driver.kill(group)
    assert _text(directory / "cgroup.kill") == "1"
    (directory / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert driver.is_empty(group)

    assert not driver.oom_killed(group)
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    assert driver.oom_killed(group)
    driver.remove(group)
    assert not directory.exists()


def test_fake_v2_without_cgroup_kill_freezes_then_kills(fake, monkeypatch):
    driver = V2Driver(Limits(), "taskman", ("254:0",), mount=str(fake), own="/")
    driver.setup()
    group = driver.create(str(uuid.uuid4()))
    directory = group.directories["unified"]
    os.unlink(os.path.join(directory, "cgroup.kill"))  # a kernel before 5.14
    freeze, events = (os.path.join(directory, name) for name in ("cgroup.freeze", "cgroup.events"))
    victim = subprocess.Popen(["sleep", "1000"])
    # The "kernel": "1" in cgroup.freeze stops the victim and reports
    # "frozen 1" only on the third look at cgroup.events (a real freezer
    # takes a moment to settle); "0" resumes it. Each SIGKILL sweep notes
    # whether the group was frozen then.
    kernel = {"freezing": False, "looks": 0}
    write, read, signal_listed = cgroupfs.write, cgroupfs.read, cgroupfs.signal_listed
    frozen_at_sweeps = []

    def set_frozen(frozen):
        with open(events, "w") as events_file:
            events_file.write(f"populated 1\nfrozen {int(frozen)}\n")
        os.kill(victim.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def kernel_write(path, value):
        write(path, value)
        if path == freeze:
            kernel.update(freezing=value == "1", looks=0)
            if value == "0":
                set_frozen(False)

    def kernel_read(path):
        if path == events and kernel["freezing"]:
            kernel["looks"] += 1
            if kernel["looks"] == 3:
                set_frozen(True)
        return read(path)

    def sweep(directories, number):
        frozen_at_sweeps.append(cgroupfs.keyed(events)["frozen"])
        return signal_listed(directories, number)

    monkeypatch.setattr(cgroupfs, "write", kernel_write)
    monkeypatch.setattr(cgroupfs, "read", kernel_read)
    monkeypatch.setattr(cgroupfs, "signal_listed", sweep)
    try:
        open(os.path.join(directory, "cgroup.procs"), "w").write(f"{victim.pid}\n")
        driver.kill(group)
        assert _text(freeze) == "10"  # frozen, then thawed
        assert frozen_at_sweeps == [1]  # killed once the group was frozen, not before
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_fake_v2_unlimited_values_are_max(fake):
    limits = Limits(cpu_quota_us=0, memory_max=0, io_read_bps=0, io_write_bps=0, pids_max=0)
    driver = V2Driver(limits, "taskman", ("254:0",), mount=str(fake), own="/")
    driver.setup()
    directory = driver.create(str(uuid.uuid4())).directories["unified"]
    assert _text(os.path.join(directory, "cpu.max")) == "max 1000000"
    assert _text(os.path.join(directory, "memory.max")) == "max"
    assert _text(os.path.join(directory, "pids.max")) == "max"
    assert _text(os.path.join(directory, "io.max")) == ""


def test_select_driver_detects_a_fake_pure_v2_host(fake, tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\ncgroup2 {fake} cgroup2 rw,nsdelegate 0 0\n")
    own = tmp_path / "proc_self_cgroup"
    own.write_text("0::/svc\n")
    monkeypatch.setattr(detect, "PROC_MOUNTS", str(mounts))
    monkeypatch.setattr(detect, "PROC_CGROUP", str(own))
    device = detect.backing_devices(["/"])[0]
    driver = cgroups.select_driver("auto", Limits(), root="taskman")
    assert isinstance(driver, V2Driver)
    assert driver.hierarchies[0].base == str(fake / "svc" / "taskman")
    assert driver.devices == (device,)
    with pytest.raises(CgroupError, match="cgroup v1 controllers cpu, memory, blkio"):
        cgroups.select_driver("hybrid", Limits(io_devices=(device,)))


def test_detect_reads_this_hosts_layout():
    host = detect.host()
    print(f"cgroup2 at {host.v2_mount} (own {host.v2_own}); v1: {host.v1_mounts}; "
          f"own v1: {host.v1_own}")
    types = _mount_types()
    cgroup2 = [mount for mount, kind in types.items() if kind == "cgroup2"]
    if not cgroup2 and "cgroup" not in types.values():
        pytest.skip("no cgroup hierarchy is mounted on this host")
    # Each hierarchy found is one the mount table has, of the right version.
    assert host.v2_mount in cgroup2 if cgroup2 else host.v2_mount is None
    for controller, mount in host.v1_mounts.items():
        assert types.get(mount) == "cgroup", controller
    # The kernel lists this very process in the group detect says is its
    # own, in every hierarchy found, v2 and v1 alike.
    own = {"cgroup2": os.path.join(host.v2_mount, host.v2_own.lstrip("/"))} if cgroup2 else {}
    for controller, mount in host.v1_mounts.items():
        own[controller] = os.path.join(mount, host.v1_own.get(controller, "/").lstrip("/"))
    for name, directory in own.items():
        assert os.getpid() in cgroupfs.pids([directory]), (name, directory)


def _mount_types():
    """Mount point -> file system type, from /proc/self/mountinfo (not the
    /proc/self/mounts that detect reads)."""
    types = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, after = line.split(" - ", 1)
            types[before.split()[4].replace("\\040", " ")] = after.split()[0]
    return types


# -- limits the kernel refuses for every task


@pytest.mark.parametrize("field, value, message", [
    ("cpu_period_us", 999, "--cpu-period-us must be 1000 to 1000000"),
    ("cpu_period_us", 1_000_001, "--cpu-period-us must be 1000 to 1000000"),
    ("cpu_quota_us", 999, r"--cpu-quota-us must be 0 \(no limit\) or at least 1000"),
    ("cpu_quota_us", -1, "--cpu-quota-us must be 0"),
    ("memory_max", -1, r"--memory-max must be 0 \(no limit\) or more"),
    ("io_read_bps", -1, "--io-read-bps must be 0"),
    ("io_write_bps", -1, "--io-write-bps must be 0"),
    ("pids_max", -1, "--pids-max must be 0"),
    ("pids_max", "20", "--pids-max must be an integer"),
])
def test_limits_the_kernel_refuses_are_invalid_arguments(field, value, message):
    with pytest.raises(InvalidArgument, match=message):
        Limits(**{field: value})
    # select_driver checks again: a caller may have forced a field after making it.
    limits = Limits()
    object.__setattr__(limits, field, value)
    with pytest.raises(InvalidArgument, match=message):
        cgroups.select_driver("auto", limits)


def test_limits_at_the_kernels_bounds_are_accepted():
    Limits(cpu_period_us=1_000, cpu_quota_us=1_000)
    Limits(cpu_period_us=1_000_000, cpu_quota_us=0, memory_max=0, io_read_bps=0,
           io_write_bps=0, pids_max=0)
