"""The audit trail: one JSON object per line for each security-relevant event.

Who did what to which task, and with what outcome: every call, each task's
start (with its command line), stop request and end (with its cause). Never
task output. The file is opened append-only and each record is one
``write(2)`` on an O_APPEND descriptor, so concurrent records never interleave
and nothing already written is rewritten.

Rotation is the operator's (logrotate, contrib/taskman-server.logrotate):
after the file is moved away, ``reopen`` (the server's SIGUSR1) starts a new
one at the same path; every record goes whole to the old file or the new.
"""

import datetime
import errno
import json
import logging
import math
import os
import threading
from typing import Optional

from taskman.task import Task, cut_args

log = logging.getLogger("taskman.audit")

# Longest command line kept in a task.started record: a user may send
# megabytes of arguments, and the trail must not become the easiest way to
# fill the server's disk. The total length is always recorded.
MAX_COMMAND_CHARS = 16 * 1024
# Longest value of any other field (task ids and details quote user input).
MAX_FIELD_CHARS = 1024

# One encoder for every record (json.dumps with options builds one per call).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
# What that encoder writes for one string: a call record, all strings but
# one float, is put together from these pieces (``call_line``).
_string = json.encoder.encode_basestring
# A call record's fields after time and event, in order; None leaves one out.
_CALL_FIELDS = ("user", "method", "task_id", "code", "peer", "detail")


class AuditLog:
    """Appends records to ``path`` (created 0600 if missing)."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._fd = _open(path)
        self._lock = threading.Lock()
        self.failures = 0  # records that could not be written

    def reopen(self) -> None:
        """Start writing to a file opened afresh at ``path`` (after logrotate
        moved the old one away). The swap is under the write lock, so no
        record is lost or split; if the path cannot be opened the old file is
        kept (OSError raised, nothing lost)."""
        fd = _open(self.path)
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def record(self, event: str, **fields) -> None:
        """Write one record; fields with value None are left out.

        Never raises for a failing disk: a full disk must not turn calls
        into errors or stop the server. Failures are counted and logged.
        """
        self._write(_line(_now(), event, fields))

    def _write(self, line: bytes) -> None:
        """Append one whole record (a line) with one write(2); count a failure."""
        try:
            with self._lock:
                written = os.write(self._fd, line)
                if written < len(line):
                    # A full disk can take part of a record: cut it off, so
                    # the trail stays whole JSON lines.
                    end = os.lseek(self._fd, 0, os.SEEK_CUR)
                    os.ftruncate(self._fd, end - written)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.error("cannot write to the audit log %s (%d record(s) lost): %s",
                          self.path, self.failures, os.strerror(error.errno))

    def call(self, user: Optional[str], method: str, code: str, task_id: Optional[str] = None,
             peer: Optional[str] = None, detail: Optional[str] = None,
             duration_ms: Optional[float] = None) -> None:
        """An RPC and its outcome (``code`` is the gRPC status name, e.g. OK, NOT_FOUND).

        Written once per call, so its line is put together directly
        (``call_line``), not through a dict and the general encoder."""
        self._write(call_line(_now(), user, method, code, task_id, peer, detail, duration_ms))

    def task_event(self, event: str, task: Task) -> None:
        """A manager listener: task started, stopping, ended."""
        fields = {"task_id": task.id, "owner": task.owner}
        if event == "started":
            fields.update(_command_fields(task), pid=task.pid)
        elif event == "stopping":
            fields.update(cause=task.source.value)
        elif event == "ended":
            fields.update(status=task.status.name, exit_code=task.exit_code,
                          signal=task.signal or None, cause=task.source.value or None)
        self.record("task." + event, **fields)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def call_line(time: str, user: Optional[str], method: str, code: str,
              task_id: Optional[str] = None, peer: Optional[str] = None,
              detail: Optional[str] = None, duration_ms: Optional[float] = None) -> bytes:
    """A call record's line, byte for byte what ``record`` would write for it."""
    values = (user, method, task_id or None, code, peer, detail or None)
    parts = ['{"time":', _string(time), ',"event":"call"']
    for key, value in zip(_CALL_FIELDS, values, strict=True):
        if value is None:
            continue
        if type(value) is not str:  # not a call's usual fields: the general way
            return _record_line(time, user, method, code, task_id, peer, detail, duration_ms)
        parts.append(f',"{key}":')
        parts.append(_string(_bounded(value)))
    if duration_ms is not None:
        rounded = round(duration_ms, 3)
        if type(rounded) is not float or not math.isfinite(rounded):
            return _record_line(time, user, method, code, task_id, peer, detail, duration_ms)
        parts.append(f',"duration_ms":{rounded!r}')  # what the encoder writes for a float
    parts.append("}\n")
    return "".join(parts).encode("utf-8", "backslashreplace")


def _record_line(time, user, method, code, task_id, peer, detail, duration_ms) -> bytes:
    """A call record's line the general way: ``record``'s."""
    return _line(time, "call", dict(
        user=user, method=method, task_id=task_id or None, code=code, peer=peer,
        detail=detail or None,
        duration_ms=round(duration_ms, 3) if duration_ms is not None else None))


def _line(time: str, event: str, fields: dict) -> bytes:
    entry = {"time": time, "event": event}
    entry.update((key, _bounded(value)) for key, value in fields.items() if value is not None)
    return (_encode(entry) + "\n").encode("utf-8", "backslashreplace")


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _bounded(value):
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + f"... ({len(value)} characters)"
    return value


def _command_fields(task: Task) -> dict:
    """command and args, cut to MAX_COMMAND_CHARS in all, with the full size."""
    kept = cut_args(task.command, task.args, MAX_COMMAND_CHARS)
    fields = {"command": task.command[:MAX_COMMAND_CHARS], "args": kept}
    if len(kept) < len(task.args) or len(task.command) > MAX_COMMAND_CHARS:
        fields["args_omitted"] = len(task.args) - len(kept)
        fields["command_line_chars"] = len(task.command) + sum(map(len, task.args))
    return fields
