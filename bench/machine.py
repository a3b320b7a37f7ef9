"""The machine a run measured on: date, CPUs, memory, kernel, cgroups, the
server's driver and command line, disk, versions and the commit."""

import contextlib
import datetime
import os
import platform
import shutil
import subprocess
from typing import Dict

import common
from common import GiB


def machine(workdir: str, server=None) -> Dict[str, str]:
    """The machine section's lines, key -> text; ``server`` a servers.TaskmanServer."""
    info = {}
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["cpus"] = f"{os.cpu_count()} ({_cpu_model()})"
    info["memory"] = f"{_meminfo('MemTotal') / GiB:.1f} GiB"
    info["kernel"] = platform.release()
    info["load"] = "load average at the start: " + " ".join(f"{value:.2f}" for value in os.getloadavg())
    info["cgroups"] = _cgroup_layout()
    if server is not None:
        info["driver"] = server.driver_line()
        info["server"] = "taskman-server " + " ".join(server.command[2:]).replace(
            workdir, "$TMP") + " (all else default)"
    usage = shutil.disk_usage(workdir)
    info["disk"] = f"{usage.free / GiB:.0f} GiB free of {usage.total / GiB:.0f} GiB at {workdir}"
    info["python"] = platform.python_version()
    info["versions"] = ", ".join(f"{name} {version(name)}" for name in
                                 ("taskman", "grpcio", "protobuf", "gevent", "supervisor",
                                  "py-spy"))
    info["commit"] = git_commit()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.machine()


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cgroup_layout() -> str:
    mounts = []
    with contextlib.suppress(OSError):
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                if fields[2] == "cgroup2":
                    mounts.append(f"cgroup2 at {fields[1]}")
                elif fields[2] == "cgroup":
                    controllers = [option for option in fields[3].split(",")
                                   if option not in ("rw", "ro", "nosuid", "nodev", "noexec",
                                                     "relatime")]
                    mounts.append(f"v1 {','.join(controllers)}")
    if any(mount.startswith("v1") for mount in mounts):
        layout = "hybrid (v1 controllers + cgroup2)" if any(
            mount.startswith("cgroup2") for mount in mounts) else "legacy v1"
    else:
        layout = "unified v2"
    return f"{layout}: {'; '.join(mounts)}"


def version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "-C", common.REPO_DIR, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", common.REPO_DIR, "status", "--porcelain",
                                "--untracked-files=no", "taskman"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" (taskman/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
