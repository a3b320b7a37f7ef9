"""Helpers for tests/reliability: a server whose leftovers can be counted, raw
gRPC access over mTLS, and bounded waits.

"Left behind" is always checked, never assumed: task groups are the
directories named like task ids under the server's cgroup root in every
hierarchy it uses (found from /proc/<server>/cgroup), output files are
listed in <state dir>/output, descriptors in /proc/<server>/fd, zombies are
children of the server in state Z.
"""

import os
import re
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import grpc
from server_harness import Server, session_pki

from support import poll_for
from taskman import tls
from taskman.api import task_manager_pb2, task_manager_pb2_grpc

CGROUP_MOUNT = "/sys/fs/cgroup"
SERVICE = "/task_manager.TaskManager/"
METHODS = ("StartTask", "StopTask", "GetTaskStatus", "StreamTaskOutput")
REQUESTS = {"StartTask": task_manager_pb2.StartTaskRequest,
            "StopTask": task_manager_pb2.StopTaskRequest,
            "GetTaskStatus": task_manager_pb2.TaskStatusRequest,
            "StreamTaskOutput": task_manager_pb2.StreamTaskOutputRequest}
# grpcio's default limit on a received message (4 MiB), enforced before our code.
MAX_RECEIVE = 4 * 1024 * 1024


# These suites load one user far past a person's normal work (200 streams,
# 1,000 tasks at once, 10,000 records kept): the per-user quotas are tested
# in test_fair_sharing.
NO_USER_QUOTAS = ("--quota-open-streams", "0", "--quota-running-tasks", "0",
                  "--quota-calls-in-flight", "0", "--quota-argument-bytes", "0",
                  "--quota-finished-records", "0", "--quota-output-bytes", "0")


class ReliableServer(Server):
    """The harness's Server, optionally on a given state dir and cgroup root
    (to restart "the same" server), plus probes of its process and leftovers.
    Per-user quotas are off (NO_USER_QUOTAS)."""

    def __init__(self, workdir: Path, *options: str, state_dir: Optional[Path] = None,
                 cgroup_root: Optional[str] = None, env: Optional[dict] = None):
        if state_dir is not None and env is None:
            # A given state directory may be a tiny file system (the disk-full
            # tests): the run's PKI is served from where it is instead of copied.
            env = {"TASKMAN_CERTS_DIR": str(session_pki())}
        super().__init__(workdir, *NO_USER_QUOTAS, *options, env=env,
                         copy_pki=state_dir is None)
        if state_dir is not None:
            self.state_dir = Path(state_dir)
            self.command[self.command.index("--state-dir") + 1] = str(self.state_dir)
        if cgroup_root is not None:
            self.command[self.command.index("--cgroup-root") + 1] = cgroup_root
        self.cgroup_root = self.command[self.command.index("--cgroup-root") + 1]
        self._root_dirs: List[str] = []

    def start(self) -> "ReliableServer":
        super().start()
        self._root_dirs = cgroup_root_dirs(self.process.pid, self.cgroup_root)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    # -- the server process

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_targets(self) -> Dict[int, str]:
        """Each open descriptor and what it is (readlink: a path, socket:[inode],
        anon_inode:[eventfd], ...), so a leak names itself."""
        found = {}
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                found[int(name)] = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:  # closed meanwhile
                continue
        return found

    def proc_status(self) -> Dict[str, str]:
        with open(f"/proc/{self.pid}/status") as status:
            return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)

    def rss_kib(self) -> int:
        return int(self.proc_status()["VmRSS"].split()[0])

    def threads(self) -> int:
        return int(self.proc_status()["Threads"])

    def children(self) -> List[tuple]:
        """(pid, state) of the server's direct children."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:
                found.append((int(name), fields[0]))
        return found

    def zombies(self) -> List[int]:
        return [pid for pid, state in self.children() if state == "Z"]

    # -- what it leaves on disk and in the cgroup trees

    def root_dirs(self) -> List[str]:
        """The server's cgroup root directory in each hierarchy (existing ones)."""
        return [path for path in self._root_dirs if os.path.isdir(path)]

    def task_groups(self) -> List[str]:
        """Every task group (directory named like a task id) under the roots,
        directly or inside a user's slice (user-<key>/)."""
        found = []
        for root in self.root_dirs():
            for name in os.listdir(root):
                path = os.path.join(root, name)
                if not os.path.isdir(path):
                    continue
                if is_task_id(name):
                    found.append(path)
                elif name.startswith("user-"):
                    found += [os.path.join(path, inner) for inner in os.listdir(path)
                              if is_task_id(inner) and os.path.isdir(os.path.join(path, inner))]
        return sorted(found)

    def output_files(self) -> List[str]:
        """Task ids that have an output file (every file in output/ listed)."""
        directory = self.state_dir / "output"
        if not directory.exists():
            return []
        return sorted(name[:-len(".log")] if name.endswith(".log") else name
                      for name in os.listdir(directory))

    def log_count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    # -- talking to it

    def channel(self, user: str = "client001", options=()) -> grpc.Channel:
        ca, cert, key = tls.client_files(user, None)
        return grpc.secure_channel(self.address, tls.channel_credentials(ca, cert, key),
                                   options=list(options))

    def stub(self, user: str = "client001", options=()):
        channel = self.channel(user, options)
        return channel, task_manager_pb2_grpc.TaskManagerStub(channel)


def cgroup_root_dirs(pid: int, root: str) -> List[str]:
    """<mount>/<pid's group>/<root> in every hierarchy /proc/<pid>/cgroup lists."""
    found = []
    with open(f"/proc/{pid}/cgroup") as cgroups:
        for line in cgroups:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if not controllers:
                mounts = ["unified", ""]
            else:
                mounts = [name.replace("name=", "") for name in controllers.split(",")]
            for mount in mounts:
                base = os.path.join(CGROUP_MOUNT, mount) if mount else CGROUP_MOUNT
                if os.path.isdir(base) and (mount or os.path.exists(
                        os.path.join(base, "cgroup.controllers"))):
                    found.append(os.path.join(base, path.lstrip("/"), root))
                    break
    return found


def is_task_id(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def raw_call(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 30.0):
    """Send ``payload`` as the serialized request of ``method``, bypassing the
    client-side protobuf (so invalid UTF-8 and malformed messages reach the
    server). Returns (code, details, responses as bytes)."""
    if method == "StreamTaskOutput":
        call = channel.unary_stream(SERVICE + method)(payload, timeout=timeout)
        responses = []
        try:
            for response in call:
                responses.append(response)
            return grpc.StatusCode.OK, "", responses
        except grpc.RpcError as error:
            return error.code(), error.details(), responses
    try:
        return grpc.StatusCode.OK, "", [channel.unary_unary(SERVICE + method)(payload,
                                                                              timeout=timeout)]
    except grpc.RpcError as error:
        return error.code(), error.details(), []


def wait_for(predicate, timeout: float = 30.0, message: str = "condition", interval=0.05):
    return poll_for(predicate, timeout, message, interval)


def wait_ended(stub, task_id: str, timeout: float = 30.0):
    def ended():
        response = stub.GetTaskStatus(task_manager_pb2.TaskStatusRequest(task_id=task_id),
                                      timeout=30)
        return response if response.status != task_manager_pb2.JOB_STATUS_STARTED else None
    return wait_for(ended, timeout, f"task {task_id} to end")
