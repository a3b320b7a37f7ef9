"""Helpers for the tests that need a pure cgroup v2 host (the VM of
vm/run-in-cgroupv2-vm): the guard that decides whether they may run, and the
few raw cgroup operations the tests themselves need to arrange groups.

The guard: these tests create groups, move processes (pytest itself) between
groups and enable controllers, so they run only on a pure cgroup v2 host, as
root, and only inside the VM (TASKMAN_IN_VM=1) unless the caller accepts that
this host's cgroups get rearranged (TASKMAN_CGROUPV2_HOST_OK=1). Otherwise they
skip with the reason, except when TASKMAN_CGROUPV2_REQUIRED=1 (set by
vm/cgroupv2-tests for `tox -e cgroupv2`): then a run that could not prove
anything fails.
"""

import os
import sys
import time

import pytest

CG_ROOT = "/sys/fs/cgroup"
NEEDED = ("cpu", "io", "memory", "pids")
IN_VM = os.environ.get("TASKMAN_IN_VM") == "1"
REQUIRED = os.environ.get("TASKMAN_CGROUPV2_REQUIRED") == "1"


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def why_not():
    """None if this is a pure cgroup v2 host we may rearrange; else the reason."""
    try:
        mounts = read("/proc/self/mounts").splitlines()
    except OSError as e:
        return f"cannot read /proc/self/mounts: {e}"
    fstype = {m.split()[1]: m.split()[2] for m in mounts if len(m.split()) > 2}
    if fstype.get(CG_ROOT) != "cgroup2":
        return (f"not a pure cgroup v2 host: {CG_ROOT} is "
                f"{fstype.get(CG_ROOT, 'not mounted')!r}, not cgroup2 "
                "(run these via `tox -e cgroupv2` or vm/run-in-cgroupv2-vm)")
    v1 = [p for p, t in fstype.items() if t == "cgroup"]
    if v1:
        return f"cgroup v1 hierarchies are mounted too ({', '.join(v1[:3])}): hybrid host"
    have = read(f"{CG_ROOT}/cgroup.controllers").split()
    missing = [c for c in NEEDED if c not in have]
    if missing:
        return f"cgroup2 root lacks controllers {missing} (has {have})"
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not IN_VM and os.environ.get("TASKMAN_CGROUPV2_HOST_OK") != "1":
        return ("refusing to rearrange this real host's cgroups: run inside "
                "vm/run-in-cgroupv2-vm or set TASKMAN_CGROUPV2_HOST_OK=1")
    return None


def require_pure_v2(module):
    """Call at module level: skip the module (printing why) unless ``why_not()``
    is None; fail it instead when TASKMAN_CGROUPV2_REQUIRED=1."""
    reason = why_not()
    if reason is None:
        return
    name = module.rsplit(".", 1)[-1]
    if REQUIRED:
        pytest.fail(f"{name}: {reason}; TASKMAN_CGROUPV2_REQUIRED=1 says this run must "
                    "prove cgroup v2", pytrace=False)
    print(f"{name}: skipped: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)


def own_cgroup():
    """The directory of this process's cgroup, e.g. /sys/fs/cgroup/taskman-vm.service."""
    return CG_ROOT + relative_cgroup().rstrip("/")


def relative_cgroup(pid="self"):
    """The ``0::`` path of /proc/<pid>/cgroup, e.g. /taskman-vm.service/pytest."""
    for line in read(f"/proc/{pid}/cgroup").splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError(f"no cgroup v2 line in /proc/{pid}/cgroup")


def procs(cg):
    return [int(p) for p in read(f"{cg}/cgroup.procs").split()]


def move_self(cg):
    """Move this process (all its threads) into the group ``cg``."""
    write(f"{cg}/cgroup.procs", str(os.getpid()))


def enable_controllers(cg):
    write(f"{cg}/cgroup.subtree_control", " ".join("+" + c for c in NEEDED))


def remove_tree(cg, timeout=10.0):
    """Kill everything below ``cg`` (which must not hold this process) and
    remove its groups, leaves first."""
    if not os.path.isdir(cg):
        return
    write(f"{cg}/cgroup.kill", "1")
    deadline = time.monotonic() + timeout
    for dirpath, _, _ in sorted(os.walk(cg), key=lambda t: -len(t[0])):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def task_group(base, task_id):
    """A task's group under ``base``: inside its user's slice (user-<key>/),
    else directly under it (the path it would have)."""
    import glob

    found = glob.glob(f"{base}/user-*/{task_id}")
    return found[0] if found else f"{base}/{task_id}"
