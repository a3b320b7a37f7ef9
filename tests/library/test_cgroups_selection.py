"""select_driver and detection on this host: start-up errors fail closed
and name the way out; IO devices default to the disks holding the state.

Needs root and cgroups for most tests (test_cgroups.select_or_skip skips
with the reason otherwise).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from test_cgroups import root_name, select_or_skip

from support import small_tmpfs
from taskman import cgroups
from taskman.cgroups import Limits, detect, v2
from taskman.errors import CgroupError

MiB = 1 << 20

pytestmark = pytest.mark.timeout(60)


def test_a_nonexistent_io_device_is_a_start_up_error():
    select_or_skip()  # skips where there is no driver at all
    with pytest.raises(CgroupError, match="8:0 does not exist"):
        cgroups.select_driver("auto", Limits(io_devices=("8:0",)), root=root_name())
    with pytest.raises(CgroupError, match="MAJ:MIN"):
        cgroups.select_driver("auto", Limits(io_devices=("sda",)), root=root_name())


def test_the_io_device_defaults_to_the_disk_holding_the_state(state_dir):
    driver = select_or_skip(io_paths=(state_dir,))
    number = os.stat(state_dir).st_dev
    assert driver.devices == (detect.whole_disk(f"{os.major(number)}:{os.minor(number)}"),)
    assert os.path.exists(f"/sys/dev/block/{driver.devices[0]}")


def test_an_unavailable_driver_fails_closed_naming_the_way_out():
    select_or_skip()
    available = detect.host().v2_controllers()
    if all(name in available for name in v2.CONTROLLERS):
        pytest.skip("this host has the v2 controllers: v2 is available")
    with pytest.raises(CgroupError, match="--cgroup-driver none"):
        cgroups.select_driver("v2", Limits(), root=root_name())
    with pytest.raises(CgroupError, match="unknown cgroup driver"):
        cgroups.select_driver("v3")


def test_without_root_the_driver_fails_closed():
    select_or_skip()
    # As nobody: a python and a copy of the package that nobody can read (the
    # test's own python may live under /root, which nobody cannot enter).
    python = next((path for path in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")
                   if _usable_by_nobody(path)), None)
    if python is None:
        pytest.skip("no python executable that the user nobody can run")
    copy = tempfile.mkdtemp(prefix="taskman-nobody-", dir="/tmp")
    try:
        os.chmod(copy, 0o755)
        package = os.path.dirname(os.path.dirname(os.path.abspath(cgroups.__file__)))
        shutil.copytree(package, os.path.join(copy, "taskman"))
        program = ("import sys; sys.path.insert(0, %r)\nfrom taskman import cgroups\n"
                   "try:\n    cgroups.select_driver('auto', root='taskman-test-nobody')\n"
                   "except cgroups.CgroupError as error:\n    print(error)\n") % copy
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 python, "-c", program], capture_output=True, text=True, timeout=20)
    finally:
        shutil.rmtree(copy)
    assert result.returncode == 0, result.stderr
    assert "--cgroup-driver none" in result.stdout
    assert "no permission" in result.stdout


def _usable_by_nobody(path):
    """True if every directory on the way to ``path`` (links resolved) lets others in."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return False
    directory = os.path.dirname(real)
    while True:
        if not os.stat(directory).st_mode & 0o001:
            return False
        if directory == "/":
            return bool(os.stat(real).st_mode & 0o001)
        directory = os.path.dirname(directory)


def test_describe_names_driver_place_and_limits():
    driver = select_or_skip(Limits(memory_max=64 * MiB, pids_max=20))
    line = driver.describe()
    print(line)
    assert driver.name in line and "64 MiB" in line and "pids 20" in line
    assert "20% of a CPU" in line and driver.hierarchies[0].base in line


def test_io_limits_fall_back_to_the_host_disks_when_paths_are_on_no_block_device(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", "1m") as mount:
        disks = detect.host_disks()
        assert disks, "this host has a disk (lsblk)"
        assert detect.backing_devices([str(mount)]) == tuple(disks)
        # A path that has a disk wins over the fallback.
        assert detect.backing_devices([str(mount), "/"]) == (detect.whole_disk(
            "%d:%d" % (os.major(os.stat("/").st_dev), os.minor(os.stat("/").st_dev))),)
