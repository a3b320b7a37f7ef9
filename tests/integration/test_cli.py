"""The RFD's UX, through the real CLI against the real server."""

import datetime
import os
import re
import subprocess
import time

import pytest
from server_harness import RFD, STATUS_COLUMNS, Cli, parse_status_table, task_readable_dir, taskman

pytestmark = pytest.mark.timeout(120)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


def test_start_prints_the_task_id_table(cli):
    result = cli.start("client001", "true")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split("\n")
    assert lines[:2] == ["TASK ID", "-------"]
    assert UUID.match(lines[2])
    assert lines[3:] == [""]
    assert result.stderr == b""


def test_get_status_of_a_finished_task(cli):
    task_id = cli.start_id("client001", "sh", "-c", "exit 0")
    row = cli.wait_ended(task_id)
    assert row["TASK ID"] == task_id
    assert TIME.match(row["START TIME"]) and TIME.match(row["END TIME"])
    assert row["START TIME"] <= row["END TIME"]
    assert int(row["PID"]) > 0
    assert row["STATUS"] == "JOB_STATUS_EXITED_OK"
    assert row["EXIT CODE"] == "0"
    assert row["SIGNAL"] == "-" and row["SOURCE"] == "-"


def test_get_status_columns_are_two_spaces_apart(cli):
    task_id = cli.start_id("client001", "true")
    cli.wait_ended(task_id)
    text = cli.run("get-status", task_id).stdout.decode()
    header, rule, row = text.rstrip("\n").split("\n")
    cells = parse_status_table(text)
    position = 0
    for name in STATUS_COLUMNS[:-1]:  # each column: its widest cell, then two spaces
        width = max(len(name), len(cells[name])) + 2
        assert header[position:position + width] == name.ljust(width)
        assert rule[position:position + width] == ("-" * len(name)).ljust(width)
        assert row[position:position + width] == cells[name].ljust(width)
        position += width
    assert header[position:] == "END TIME" and row[position:] == cells["END TIME"]


@pytest.mark.skipif(not RFD.exists(), reason=f"the RFD is not at {RFD}")
def test_the_rfds_get_status_example_renders_identically():
    from taskman.cli.client import STATUS_COLUMNS as columns
    from taskman.cli.client import format_table

    block = re.search(r"\$ taskman get-status a7da\S+ --user-id client001\n(TASK ID.*?)\n```",
                      RFD.read_text(), flags=re.S).group(1)
    example_row = ("a7da14c7-b47a-4535-a263-5bb26e503002", "2024-11-10 22:58:00", "2345",
                   "JOB_STATUS_EXITED_OK", "0", "-", "-", "2024-11-10 23:00:00")
    assert format_table(columns, [example_row]) == block


def test_get_status_of_a_running_task_leaves_the_end_empty(cli):
    task_id = cli.start_id("client001", "sleep", "30")
    row = cli.status_row(task_id)
    assert row["STATUS"] == "JOB_STATUS_STARTED"
    assert row["EXIT CODE"] == "-" and row["END TIME"] == "-"
    assert row["SIGNAL"] == "-" and row["SOURCE"] == "-"
    cli.run("stop", task_id)


def test_exit_code_and_error_status(cli):
    task_id = cli.start_id("client001", "sh", "-c", "exit 7")
    row = cli.wait_ended(task_id)
    assert row["STATUS"] == "JOB_STATUS_EXITED_ERROR" and row["EXIT CODE"] == "7"


def test_stop_prints_the_sentence_and_the_task_is_signaled(cli):
    task_id = cli.start_id("client001", "sleep", "60")
    result = cli.run("stop", task_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"Task {task_id} stop request received.\n"
    row = cli.wait_ended(task_id)
    assert row["STATUS"] == "JOB_STATUS_SIGNALED"
    assert row["SIGNAL"] == "SIGTERM" and row["SOURCE"] == "user"
    assert row["EXIT CODE"] == "143"
    # Stopping an ended task has no effect and is not an error.
    again = cli.run("stop", task_id)
    assert again.returncode == 0 and cli.status_row(task_id) == row


def test_arguments_may_begin_with_dashes(cli, tmp_path):
    task_id = cli.start_id("client001", "printf", "%s|", "--help", "-n", "--", "a b")
    cli.wait_ended(task_id)
    assert cli.run("stream", task_id).stdout == b"--help|-n|--|a b|"


def test_stream_is_byte_exact_with_binary_output(cli):
    data = bytes(range(256)) * 64 + os.urandom(300_000) + b"\0\r\n\xff"
    source = task_readable_dir() / "data.bin"  # tasks see neither /tmp nor /root
    source.write_bytes(data)
    source.chmod(0o644)
    task_id = cli.start_id("client001", "cat", str(source))
    cli.wait_ended(task_id)
    result = cli.run("stream", task_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    assert result.stderr == b""


def test_stream_combines_stdout_and_stderr(cli):
    task_id = cli.start_id("client001", "sh", "-c", "echo out; echo err >&2; echo out2")
    cli.wait_ended(task_id)
    assert cli.run("stream", task_id).stdout == b"out\nerr\nout2\n"


def test_stream_of_a_finished_task_ends_at_eof(cli):
    task_id = cli.start_id("client001", "sh", "-c", "seq 1 1000")
    cli.wait_ended(task_id)
    began = time.monotonic()
    result = cli.run("stream", task_id, timeout=20)
    assert result.returncode == 0
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 1001)).encode()
    assert time.monotonic() - began < 10


def test_live_stream_follows_a_running_task(cli, server):
    task_id = cli.start_id("client001", "sh", "-c",
                           "echo first; sleep 2; echo second; sleep 1; echo third")
    follower = cli.follow(task_id)
    try:
        first = follower.stdout.readline()  # arrives while the task still runs
        assert first == b"first\n"
        assert cli.status_row(task_id)["STATUS"] == "JOB_STATUS_STARTED"
        rest, errors = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    assert follower.returncode == 0, errors
    assert rest == b"second\nthird\n"
    assert cli.status_row(task_id)["STATUS"] == "JOB_STATUS_EXITED_OK"


def test_streams_of_a_stopped_task_end(cli, server):
    task_id = cli.start_id("client001", "sh", "-c", "echo up; exec sleep 60")
    followers = [cli.follow(task_id, user)
        for user in ("client001", "admin")]
    try:
        for follower in followers:
            assert follower.stdout.readline() == b"up\n"
        assert cli.run("stop", task_id).returncode == 0
        for follower in followers:
            out, errors = follower.communicate(timeout=30)
            assert follower.returncode == 0, errors
            assert out == b""
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait(10)


def test_ctrl_c_during_a_stream_exits_quietly(cli, server):
    task_id = cli.start_id("client001", "sh", "-c", "echo up; exec sleep 60")
    follower = cli.follow(task_id)
    try:
        assert follower.stdout.readline() == b"up\n"
        follower.send_signal(subprocess.signal.SIGINT)
        out, errors = follower.communicate(timeout=20)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    assert follower.returncode == 130
    assert errors == b""
    cli.run("stop", task_id)


def test_times_are_local_and_close_to_now(cli):
    """Under a zone 5 h 45 min from UTC, the CLI prints that zone's time, not UTC."""
    import zoneinfo

    zone = "Asia/Kathmandu"
    try:
        local = zoneinfo.ZoneInfo(zone)
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip(f"no time zone data for {zone}")
    task_id = cli.start_id("client001", "true")
    cli.wait_ended(task_id)
    result = cli.run("get-status", task_id, env={"TZ": zone})
    assert result.returncode == 0, result.stderr
    row = parse_status_table(result.stdout.decode())
    now = datetime.datetime.now(datetime.timezone.utc)
    for column in ("START TIME", "END TIME"):
        printed = datetime.datetime.strptime(row[column], "%Y-%m-%d %H:%M:%S")
        assert abs((now.astimezone(local).replace(tzinfo=None) - printed).total_seconds()) < 60
        assert abs((now.replace(tzinfo=None) - printed).total_seconds()) > 5 * 3600  # not UTC


# -- errors: one sentence on stderr, a distinct exit code per class

def test_unknown_task_is_not_found(cli):
    result = cli.run("get-status", "a7da14c7-b47a-4535-a263-5bb26e503002")
    assert result.returncode == 4
    assert result.stdout == b""
    assert result.stderr.decode() == \
        "taskman: task a7da14c7-b47a-4535-a263-5bb26e503002 not found\n"


def test_malformed_task_id_is_invalid_argument(cli):
    result = cli.run("stop", "not-a-uuid")
    assert result.returncode == 3
    assert b"malformed task id" in result.stderr
    assert b"Traceback" not in result.stderr


def test_unknown_command_is_invalid_argument(cli):
    result = cli.start("client001", "no-such-command-here")
    assert result.returncode == 3
    assert result.stderr.count(b"\n") == 1 and b"no-such-command-here" in result.stderr


def test_unknown_user_names_the_users_that_exist(cli):
    result = cli.run("get-status", "a7da14c7-b47a-4535-a263-5bb26e503002", user="mallory")
    assert result.returncode == 2
    message = result.stderr.decode()
    assert "unknown user 'mallory'" in message
    for user in ("admin", "client001", "client002"):
        assert user in message


def test_server_down_says_cannot_reach(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = taskman("get-status", "a7da14c7-b47a-4535-a263-5bb26e503002", "--user-id",
                     "client001", "--server-address", f"127.0.0.1:{port}")
    assert result.returncode == 7
    assert result.stderr.decode().startswith(f"taskman: cannot reach server at 127.0.0.1:{port}")
    assert result.stderr.count(b"\n") == 1


@pytest.mark.parametrize("argv", [
    ["start", "--user-id", "client001"],            # no command
    ["get-status", "--user-id", "client001"],       # no task id
    ["stop", "a7da14c7-b47a-4535-a263-5bb26e503002"],  # no --user-id
    ["stream", "x", "--user-id", "u", "--bogus"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(argv):
    result = taskman(*argv)
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr and result.stderr


def test_main_help_documents_the_exit_codes():
    result = taskman("--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for code in ("130", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        assert code in text


def _rfd_help(command: str) -> str:
    """The RFD's help text for ``command``: the fenced block with its usage line."""
    text = RFD.read_text()
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        if re.search(rf"^Usage:\n  taskman {command} ", block, flags=re.M):
            lines = block.split("\n")
            if lines[0].startswith("$ taskman"):
                lines = lines[1:]
            return "\n".join(line.rstrip() for line in lines).strip("\n")
    raise AssertionError(f"no help block for {command} in the RFD")


@pytest.mark.skipif(not RFD.exists(), reason=f"the RFD is not at {RFD}")
@pytest.mark.parametrize("command", ["start", "get-status", "stop", "stream"])
def test_help_is_the_rfds(command):
    result = taskman(command, "--help")
    assert result.returncode == 0
    shown = "\n".join(line.rstrip() for line in result.stdout.decode().split("\n")).strip("\n")
    assert shown == _rfd_help(command)


def test_help_wins_even_without_required_options():
    result = taskman("stream", "--help")
    assert result.returncode == 0 and result.stdout.startswith(b"Usage:\n  taskman stream ")


def test_status_table_parser_rejects_garbage():
    with pytest.raises(AssertionError):
        parse_status_table("nonsense\n")


def test_cli_from_another_directory(server, tmp_path):
    """The certificates ship with the package: any working directory works."""
    result = Cli(server).start("client002", "true", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
