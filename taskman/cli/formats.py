"""How the ``taskman`` CLI renders what it gets: the RFD's tables, JSON
objects for scripts, and timestamped output lines.

Table cells never carry control characters: a command or name holding a
newline or an escape sequence would break the table or the terminal, so
they are written as Python escapes (``\\n``, ``\\x1b``). JSON needs no such
care: the encoder escapes them itself.
"""

import datetime
import json
from typing import Optional

OUTPUT_FORMATS = ("table", "json")


def format_time(moment: Optional[datetime.datetime]) -> str:
    """Local time as YYYY-MM-DD HH:MM:SS, or "-"."""
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def rfc3339(moment: Optional[datetime.datetime]) -> Optional[str]:
    """UTC as 2026-01-02T03:04:05.123456Z (microseconds), or None."""
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def escape_cell(text: str) -> str:
    """``text`` with every non-printable character as its Python escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_table(headers, rows) -> str:
    """Columns two spaces apart, a dashed rule under each header, as in the RFD."""
    rows = [[escape_cell(cell) for cell in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    rule = ["-" * len(header) for header in headers]
    return "\n".join(line(cells) for cells in (headers, rule, *rows))


# -- JSON: one object per task, the field names docs/cli.md documents

def status_object(status) -> dict:
    """A taskman.client.TaskStatus as JSON-ready values; unset fields are null."""
    return {
        "task_id": status.task_id,
        "owner": status.owner,
        "command": status.command,
        "args": list(status.args),
        "process_id": status.process_id or None,
        "status": status.status,
        "exit_code": status.exit_code,
        "termination_signal": status.termination_signal or None,
        "termination_source": status.termination_source or None,
        "start_time": rfc3339(status.start_time),
        "end_time": rfc3339(status.end_time),
        "output_bytes": status.output_bytes,
        "output_dropped_bytes": status.output_dropped_bytes,
        "output_note": status.output_note or None,
    }


def json_line(value: dict) -> str:
    """One object on one line (so a listing is JSON Lines)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class TimestampedLines:
    """Writes output with an RFC 3339 prefix before each line, as
    ``kubectl logs --timestamps`` does: the time the server read the chunk
    that holds the line's first byte. Chunks may end mid-line, so it keeps
    whether the next byte starts a line."""

    def __init__(self, write):
        self.write = write
        self.at_line_start = True

    def __call__(self, data: bytes, moment: Optional[datetime.datetime]) -> None:
        prefix = ((rfc3339(moment) or "-") + " ").encode()
        lines = data.split(b"\n")
        parts = []
        for number, line in enumerate(lines):
            last = number == len(lines) - 1
            if last and not line:
                break  # data ended with a newline: the next line starts later
            if self.at_line_start:
                parts.append(prefix)
            parts.append(line if last else line + b"\n")
            self.at_line_start = not last
        if data:
            self.at_line_start = data.endswith(b"\n")
        self.write(b"".join(parts))
