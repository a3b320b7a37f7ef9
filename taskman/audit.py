"""The audit trail: one JSON object per line for each security-relevant event.

Who did what to which task, and with what outcome: every call, each task's
start (with its command line), stop request and end (with its cause). Never
task output. The file is opened append-only and each record is one
``write(2)`` on an O_APPEND descriptor, so concurrent records never interleave
and nothing already written is rewritten.
"""

import datetime
import json
import os
import threading
from typing import Optional

from taskman.task import Task


class AuditLog:
    """Appends records to ``path`` (created 0600 if missing)."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()

    def record(self, event: str, **fields) -> None:
        """Write one record; fields with value None are left out."""
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="microseconds"), "event": event}
        entry.update((key, value) for key, value in fields.items() if value is not None)
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":"),
                           default=str) + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            os.write(self._fd, line)

    def call(self, user: Optional[str], method: str, code: str, task_id: Optional[str] = None,
             peer: Optional[str] = None, detail: Optional[str] = None,
             duration_ms: Optional[float] = None) -> None:
        """An RPC and its outcome (``code`` is the gRPC status name, e.g. OK, NOT_FOUND)."""
        self.record("call", user=user, method=method, task_id=task_id or None, code=code,
                    peer=peer, detail=detail or None,
                    duration_ms=round(duration_ms, 3) if duration_ms is not None else None)

    def task_event(self, event: str, task: Task) -> None:
        """A manager listener: task started, stopping, ended."""
        fields = {"task_id": task.id, "owner": task.owner}
        if event == "started":
            fields.update(command=task.command, args=task.args, pid=task.pid)
        elif event == "stopping":
            fields.update(cause=task.source.value)
        elif event == "ended":
            fields.update(status=task.status.name, exit_code=task.exit_code,
                          signal=task.signal or None, cause=task.source.value or None)
        self.record("task." + event, **fields)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
