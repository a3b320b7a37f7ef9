"""Resource limits through the real server and CLI: a task that goes past its
memory, CPU or process limit is held (or ended) by the kernel, and the API
says so.

The server runs with small limits; each test reads the task's own cgroup
files (found by task id under the server's cgroup root) for what the kernel
counted, not wall-clock guesses. Tasks run /usr/bin/python3 or the shell,
never this interpreter: it lives in a virtualenv a task user may not read.
"""

import glob
import os
import time

import gevent
import pytest
from server_harness import DRIVER, Cli, Server, wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(DRIVER == "none", reason="the none driver enforces no limits")]

PYTHON = "/usr/bin/python3"
PIDS_MAX = 20
CPU_QUOTA_US, CPU_PERIOD_US = 100000, 1000000


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """One server for the module with a 64 MiB, 10%-of-a-CPU, 20-process limit."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: the server manages cgroups (uid {os.geteuid()})")
    server = Server(tmp_path_factory.mktemp("limits"), "--memory-max", "64M",
                    "--cpu-quota-us", str(CPU_QUOTA_US), "--cpu-period-us", str(CPU_PERIOD_US),
                    "--pids-max", str(PIDS_MAX)).start()
    yield server
    status = server.stop()
    assert status == 0, f"taskman-server exited with {status} on SIGTERM:\n{server.log()}"


@pytest.fixture
def cli(limited):
    return Cli(limited)


def task_directories(server: Server, task_id: str) -> list:
    """The task's group in every hierarchy (v1 controllers, unified or v2), inside
    its user's slice."""
    root = server.command[server.command.index("--cgroup-root") + 1]
    found = []
    for depth in range(0, 6):
        found += glob.glob(os.path.join("/sys/fs/cgroup", *["*"] * depth, root, "user-*",
                                        task_id))
    return found


def read_keyed(path: str) -> dict:
    with open(path) as file:
        return {key: int(value) for key, value in (line.split() for line in file)}


def cpu_usage_seconds(directories: list) -> float:
    """CPU time the task's group has used: cpu.stat's usage_usec (any cgroup2
    group has it, even with no controller enabled) or v1 cpuacct.usage."""
    for directory in directories:
        stat = os.path.join(directory, "cpu.stat")
        if os.path.exists(stat) and "usage_usec" in read_keyed(stat):
            return read_keyed(stat)["usage_usec"] / 1e6
    for directory in directories:
        usage = os.path.join(directory, "cpuacct.usage")
        if os.path.exists(usage):
            with open(usage) as file:
                return int(file.read()) / 1e9
    raise AssertionError(f"no CPU usage counter in {directories}")


def processes_in(directories: list) -> int:
    """The most processes any of the task's groups lists (a group's subgroups included)."""
    most = 0
    for directory in directories:
        count = 0
        for path, _, files in os.walk(directory):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(path, "cgroup.procs")) as procs:
                        count += len(procs.read().split())
                except FileNotFoundError:
                    pass  # removed while we walked
        most = max(most, count)
    return most


def test_memory_hog_is_oom_killed_and_the_status_says_oom(cli):
    task = cli.start_id("client001", PYTHON, "-c", "data = b'x' * (256 << 20)")
    row = cli.wait_ended(task, timeout=60)
    assert (row["STATUS"], row["EXIT CODE"], row["SIGNAL"], row["SOURCE"]) == \
        ("JOB_STATUS_SIGNALED", "137", "SIGKILL", "oom"), row


def test_memory_under_the_limit_is_fine(cli):
    task = cli.start_id("client001", PYTHON, "-c", "data = b'x' * (16 << 20)")
    row = cli.wait_ended(task, timeout=60)
    assert (row["STATUS"], row["SOURCE"]) == ("JOB_STATUS_EXITED_OK", "-"), row


def test_busy_loop_gets_no_more_cpu_than_its_quota(cli, limited):
    task = cli.start_id("client001", "sh", "-c", "while :; do :; done")
    try:
        directories = wait_for(lambda: task_directories(limited, task),
                               message="the task's groups")
        wait_for(lambda: cpu_usage_seconds(directories) > 0, message="the loop to run")
        window = 4.0
        used_before, started = cpu_usage_seconds(directories), time.monotonic()
        time.sleep(window)
        used = cpu_usage_seconds(directories) - used_before
        elapsed = time.monotonic() - started
        share = used / elapsed
        quota = CPU_QUOTA_US / CPU_PERIOD_US
        print(f"busy loop under {CPU_QUOTA_US}/{CPU_PERIOD_US} us: {used:.3f} s of CPU "
              f"in {elapsed:.2f} s = {share:.1%}")
        # A window not aligned with the periods can hold one period's quota more.
        assert share <= quota * (elapsed + 1) / elapsed + 0.02, share
        assert share >= quota / 4, share  # it did run
    finally:
        assert cli.run("stop", task).returncode == 0
    assert cli.wait_ended(task)["SIGNAL"] == "SIGTERM"


FORK_LOOP = """\
import os, time
failed = 0
# At most 60 children whatever happens, so a broken limit cannot bomb the host.
for _ in range(60):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError as error:
        failed += 1
        print("fork failed:", error, flush=True)
print("forks failed:", failed, flush=True)
time.sleep(30)
"""


def test_fork_loop_stops_at_pids_max(cli, limited):
    task = cli.start_id("client001", PYTHON, "-c", FORK_LOOP)
    follower = cli.follow(task)
    output = bytearray()
    reader = gevent.spawn(lambda: [output.extend(chunk) for chunk in iter(
        lambda: follower.stdout.read1(65536), b"")])
    try:
        directories = wait_for(lambda: task_directories(limited, task),
                               message="the task's groups")
        most = 0

        def counted_until_done():
            nonlocal most
            most = max(most, processes_in(directories))
            assert most <= PIDS_MAX, f"{most} processes in a group limited to {PIDS_MAX}"
            return b"forks failed:" in output

        wait_for(counted_until_done, timeout=30, interval=0.02, message="the fork loop to end")
        most = max(most, processes_in(directories))
        assert most <= PIDS_MAX, f"{most} processes in a group limited to {PIDS_MAX}"
    finally:
        cli.run("stop", task)
        follower.wait(30)
        reader.join(10)
    text = output.decode()
    failed = int(text.split("forks failed:")[1].split()[0])
    print(f"fork loop under pids.max {PIDS_MAX}: at most {most} processes, {failed} forks failed")
    assert most == PIDS_MAX  # the loop did reach the limit
    assert failed == 60 - (PIDS_MAX - 1), text  # the main process is one of the 20
    assert text.count("fork failed: [Errno 11] Resource temporarily unavailable") == failed
