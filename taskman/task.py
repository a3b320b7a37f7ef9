"""The task record and its states.

Standard library only: the states mirror the proto's ``JobStatus`` numbers so
the servicer can copy them across, but nothing here imports the proto.
"""

import dataclasses
import datetime
import enum
import os
import signal
from typing import Optional


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
