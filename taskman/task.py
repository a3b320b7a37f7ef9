"""The task record and its states.

Standard library only: the states mirror the proto's ``JobStatus`` numbers so
the servicer can copy them across, but nothing here imports the proto.
"""

import dataclasses
import datetime
import enum
import os
import shlex
import signal
import uuid
from typing import List, Optional

from taskman.errors import InvalidArgument


class JobStatus(enum.IntEnum):
    UNKNOWN = 0
    STARTED = 1
    SIGNALED = 2
    EXITED_OK = 3
    EXITED_ERROR = 4


class Source(str, enum.Enum):
    """Who ended a task, when something other than the task itself did."""

    NONE = ""  # the task ended on its own
    USER = "user"  # a stop request
    OOM = "oom"  # the kernel's OOM killer, inside the task's memory limit
    SYSTEM = "system"  # a signal taskman did not send (the task, another process)
    SERVER = "server"  # the server shut down or died while the task ran
    LOST = "lost"  # fleet mode: the task's host stopped answering (status UNKNOWN)


def signal_name(number: int) -> str:
    """``9`` -> ``"SIGKILL"``; an unnamed real-time signal -> ``"SIG41"``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


@dataclasses.dataclass
class Task:
    """What the manager knows of one task; mutated only by the manager."""

    id: str
    owner: str
    command: str
    args: list
    pid: int = 0
    status: JobStatus = JobStatus.STARTED
    exit_code: Optional[int] = None
    signal: str = ""
    source: Source = Source.NONE
    start_time: Optional[datetime.datetime] = None
    end_time: Optional[datetime.datetime] = None
    output_size: int = 0  # bytes kept in the output log
    output_dropped: int = 0  # bytes not kept: over the cap, or the disk failed
    output_note: str = ""  # why bytes were dropped, for the status

    @property
    def running(self) -> bool:
        return self.status == JobStatus.STARTED

    def finish(self, wait_status: int, source: Source, sent_signal: int = 0,
               end_time: Optional[datetime.datetime] = None) -> None:
        """Record the end of the main process from its ``waitpid`` status.

        ``source`` is who caused the end, if known (a stop, the OOM killer,
        the server); ``sent_signal`` is the signal taskman sent to cause it,
        kept even when the task caught it and exited by itself.
        """
        self.end_time = end_time or now()
        if os.WIFSIGNALED(wait_status):
            number = os.WTERMSIG(wait_status)
            self.status = JobStatus.SIGNALED
            self.exit_code = 128 + number  # the shell's convention, as in `$?`
            self.signal = signal_name(number)
            self.source = source if source is not Source.NONE else Source.SYSTEM
        else:
            self.exit_code = os.WEXITSTATUS(wait_status)
            self.status = JobStatus.EXITED_OK if self.exit_code == 0 else JobStatus.EXITED_ERROR
            self.signal = signal_name(sent_signal) if sent_signal else ""
            self.source = source

    def snapshot(self) -> "Task":
        """A copy safe to hand out: callers cannot mutate the live record."""
        return dataclasses.replace(self, args=list(self.args))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


_TASK_ID_EXAMPLE = "a7da14c7-b47a-4535-a263-5bb26e503002"


def parse_task_id(task_id: str) -> str:
    """Return the canonical (lower-case, hyphenated) form of a task id.

    Raises InvalidArgument if ``task_id`` is not a hyphenated UUID.
    """
    if isinstance(task_id, str) and is_task_id(task_id.lower()):
        return task_id.lower()
    raise InvalidArgument(f"malformed task id {task_id!r}: expected a UUID such as "
                          f"{_TASK_ID_EXAMPLE}")


def is_task_id(name: str) -> bool:
    """True if ``name`` is a task id in canonical form (a cgroup or file name, say)."""
    if not isinstance(name, str) or len(name) != 36:
        return False
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def cut_args(command: str, args: List[str], limit: int) -> List[str]:
    """The leading arguments that fit in ``limit`` characters with the command.

    For display only (listings, logs, the audit trail): users may send
    megabytes of arguments. An argument that does not fit whole is left out.
    """
    budget = limit - len(command)
    kept = []
    for argument in args:
        if len(argument) > budget:
            break
        kept.append(argument)
        budget -= len(argument)
    return kept


def command_line(command: str, args: List[str], limit: int = 500) -> str:
    """The command line as a shell would read it, on one line, cut at ``limit``
    characters with the full length said; "-" for no command."""
    if not command:
        return "-"
    text = shlex.join([command, *args]).replace("\n", " ")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
