"""The audit trail: one JSON line per record, bounded fields, a full disk tolerated."""

import json
import os

from support import small_tmpfs
from taskman.audit import MAX_COMMAND_CHARS, AuditLog
from taskman.task import Task


def records(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def test_records_are_json_lines_without_empty_fields(tmp_path):
    audit = AuditLog(str(tmp_path / "audit.log"))
    audit.call("client001", "GetTaskStatus", "NOT_FOUND", task_id="t", peer="ipv4:127.0.0.1:1")
    audit.task_event("started", Task(id="t", owner="client001", command="ls", args=["-l"], pid=7))
    first, second = records(tmp_path / "audit.log")
    assert first["event"] == "call" and first["code"] == "NOT_FOUND" and "detail" not in first
    assert (second["event"], second["command"], second["args"], second["pid"]) == \
        ("task.started", "ls", ["-l"], 7)
    assert oct(os.stat(tmp_path / "audit.log").st_mode & 0o777) == "0o600"


def test_huge_command_lines_and_ids_are_cut_with_their_size(tmp_path):
    audit = AuditLog(str(tmp_path / "audit.log"))
    args = ["a" * 10_000, "b" * 10_000, "c"]
    audit.task_event("started", Task(id="t", owner="u", command="echo", args=args))
    audit.call("u", "StopTask", "INVALID_ARGUMENT", task_id="z" * 100_000)
    started, call = records(tmp_path / "audit.log")
    assert started["args"] == ["a" * 10_000] and started["args_omitted"] == 2
    assert started["command_line_chars"] == 4 + 20_001
    assert len(json.dumps(started)) < MAX_COMMAND_CHARS + 1000
    assert len(call["task_id"]) < 1100 and call["task_id"].endswith("(100000 characters)")


def test_a_full_disk_loses_records_but_never_raises(tmp_path):
    with small_tmpfs(tmp_path / "tiny", "8k") as mount:
        audit = AuditLog(str(mount / "audit.log"))
        for _ in range(200):
            audit.call("u", "GetTaskStatus", "OK", detail="x" * 500)
        assert audit.failures > 0
        assert all(record["event"] == "call" for record in records(mount / "audit.log"))


def test_a_call_record_is_written_as_the_general_encoder_would_write_it():
    """``call_line`` (a call's record, put together directly) is byte for
    byte the general path's line, whatever the fields hold."""
    from taskman.audit import _record_line, call_line

    when = "2026-12-02T21:00:00.123456+00:00"
    texts = [None, "", "client001", 'a"b\\c', "line\nbreak\x00\x1b\x7f", "\u2028é€😀",
             "\ud800", "z" * 5000, "/t"]
    durations = [None, 0.0, -0.0, 0.3125, 1e-9, 123.45678, 1e20, 7, float("nan"), float("inf")]
    for index, text in enumerate(texts):
        for duration in durations:
            fields = (when, text, "GetTaskStatus", "OK", text, "ipv4:127.0.0.1:1", text, duration)
            assert call_line(*fields) == _record_line(*fields)
            other = (when, "u", text or "M", "NOT_FOUND", None, text, texts[index - 1], duration)
            assert call_line(*other) == _record_line(*other)
    # Not a string (no caller passes one): still the general encoder's line.
    odd = (when, 7, "GetTaskStatus", "OK", None, None, None, 1.5)
    assert call_line(*odd) == _record_line(*odd)
