"""The hand-over: what a reloading server tells the image it execs.

On a reload (SIGHUP, ``taskman.reload``) the server execs a new image of
itself in the same process, so its running tasks stay its children. What
the new image cannot find out by itself is written here first: which tasks
run, their pids, the descriptors of their output pipes (kept open across the
exec), how much output each log holds, their cgroups, and where a stop
stood (who asked, which signal went out, when SIGKILL is due). The port the
old image listened on is kept too, so a server started on port 0 comes back
on the same port.

One JSON file, written atomically (a temporary file, rename) in the
server's 0700 state directory, mode 0600. It names its format and version:
a new image reads the versions it knows and refuses any other with one
sentence (``HandoverError``), and the caller then ends the tasks cleanly
(``taskman.reload``, last resort). Its pid must be the reader's own: the
file of a process that died is not a hand-over to anyone.

Standard library only: the new image reads this before grpc is imported.
"""

import dataclasses
import json
import os
import time
from typing import List, Optional

from taskman.errors import TaskmanError

FORMAT = "taskman-handover"
VERSION = 1
FILE_NAME = "handover.json"
# The new image finds the hand-over through this variable (the command line
# stays the operator's, so ``--check`` and the exec see the same options).
VARIABLE = "TASKMAN_HANDOVER"
# The old image's nice value before the reload raised its priority
# (taskman.reload.boost_priority): the new image goes back to it before it
# spawns anything, also when the hand-over itself cannot be read.
NICE_VARIABLE = "TASKMAN_RELOAD_NICE"
# The same for the nice value of the server's autogroup (its session's
# share of the CPU, taskman.reload.boost_autogroup).
AUTOGROUP_NICE_VARIABLE = "TASKMAN_RELOAD_AUTOGROUP_NICE"
# Set for the ``--check`` a reload runs: it checks what the new image needs
# to start, and skips what only informs an operator (taskman.cli.check).
CHECK_VARIABLE = "TASKMAN_RELOAD_CHECK"


class HandoverError(TaskmanError):
    """A hand-over that cannot be used: unreadable, malformed, another
    version, or another process's."""


@dataclasses.dataclass
class Pipe:
    """An output pipe's read end, open across the exec."""

    stream: int  # taskman.output.Stream's number
    fd: int


@dataclasses.dataclass
class TaskState:
    """One running task as the old image left it."""

    id: str
    owner: str
    command: str
    args: List[str]
    pid: int
    start_time: str  # ISO 8601, UTC
    start_identity: str  # taskman.host.start_identity at spawn
    uid: int
    pipes: List[Pipe]
    output_size: int  # bytes in the log: the new pump appends after them
    output_dropped: int = 0
    output_capped: bool = False
    output_error: str = ""
    index_records: int = 0
    group_directories: dict = dataclasses.field(default_factory=dict)  # hierarchy -> path
    slice_name: Optional[str] = None
    stop_source: str = ""  # taskman.task.Source's value; "" when no stop was asked
    sent_signal: int = 0
    kill_at: Optional[float] = None  # CLOCK_MONOTONIC (system-wide) time SIGKILL is due
    wait_status: Optional[int] = None  # reaped by the old image, not yet recorded


@dataclasses.dataclass
class Handover:
    pid: int
    port: int
    tasks: List[TaskState]
    version: int = VERSION
    written_at: float = dataclasses.field(default_factory=time.time)

    @property
    def pids(self) -> List[int]:
        return [task.pid for task in self.tasks]

    @property
    def fds(self) -> List[int]:
        return [pipe.fd for task in self.tasks for pipe in task.pipes]


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def write(handover: Handover, state_dir: str) -> str:
    """Write ``handover`` atomically into ``state_dir``; return its path.

    Raises OSError (the caller gives up the reload and keeps serving).
    """
    path = path_in(state_dir)
    temporary = f"{path}.{os.getpid()}.tmp"
    # Not dataclasses.asdict: it deep-copies every value, and this runs while
    # no call is served (~0.1 s of 1,000 tasks' 0.15 s here).
    tasks = [{**vars(task), "pipes": [vars(pipe) for pipe in task.pipes]}
             for task in handover.tasks]
    document = {"format": FORMAT, **vars(handover), "tasks": tasks}
    data = json.dumps(document, separators=(",", ":")).encode()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # No fsync: this process reads it back within a second, and a crash
        # of the host in between ends the tasks it names anyway.
    finally:
        os.close(fd)
    try:
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def read(path: str, pid: Optional[int] = None) -> Handover:
    """The hand-over at ``path``, checked; HandoverError if it cannot be used.

    ``pid`` (default: this process's) must be the one that wrote it.
    """
    try:
        with open(path, "rb") as file:
            document = json.loads(file.read())
    except OSError as error:
        raise HandoverError(f"cannot read the hand-over {path}: {error.strerror}") from None
    except ValueError as error:
        raise HandoverError(f"the hand-over {path} is not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise HandoverError(f"{path} is not a taskman hand-over")
    version = document.get("version")
    if version != VERSION:
        raise HandoverError(f"the hand-over {path} has format version {version!r}; this "
                            f"taskman-server reads version {VERSION} only")
    try:
        tasks = [_task(entry) for entry in document["tasks"]]
        handover = Handover(pid=_integer(document["pid"]), port=_integer(document["port"]),
                            tasks=tasks, version=version,
                            written_at=float(document["written_at"]))
    except (KeyError, TypeError, ValueError) as error:
        raise HandoverError(f"the hand-over {path} is malformed: {error!r}") from None
    expected = os.getpid() if pid is None else pid
    if handover.pid != expected:
        raise HandoverError(f"the hand-over {path} was written by process {handover.pid}, "
                            f"not this one ({expected})")
    return handover


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_TASK_FIELDS = frozenset(field.name for field in dataclasses.fields(TaskState))


def _task(entry: dict) -> TaskState:
    unknown = set(entry) - _TASK_FIELDS
    if unknown:
        raise ValueError(f"unknown task fields {sorted(unknown)}")
    entry = dict(entry)
    entry["pipes"] = [Pipe(stream=_integer(pipe["stream"]), fd=_integer(pipe["fd"]))
                      for pipe in entry["pipes"]]
    task = TaskState(**entry)
    if not isinstance(task.id, str) or _integer(task.pid) <= 1:
        raise ValueError(f"bad task id or pid: {task.id!r} {task.pid!r}")
    if not isinstance(task.args, list) or not all(isinstance(arg, str) for arg in task.args):
        raise ValueError(f"task {task.id}: bad args")
    _integer(task.output_size)
    return task


def _integer(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r}")
    return value
