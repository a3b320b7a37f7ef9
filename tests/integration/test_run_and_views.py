"""taskman run, JSON output, output views and reconnection, through the real
server and CLI (issue #17)."""

import datetime
import json
import os
import signal
import subprocess
import time

import pytest
from server_harness import Cli, program, program_env, taskman, wait_for

pytestmark = pytest.mark.timeout(180)

# A task that writes both streams, interleaved, with pauses so that the two
# pipes are read in turn.
INTERLEAVED = ("for i in $(seq 1 40); do echo out$i; echo err$i >&2; "
               "[ $((i % 10)) = 0 ] && sleep 0.05; done")
EXPECTED_OUT = "".join(f"out{i}\n" for i in range(1, 41)).encode()
EXPECTED_ERR = "".join(f"err{i}\n" for i in range(1, 41)).encode()

STATUS_FIELDS = {"task_id", "owner", "command", "args", "process_id", "status", "exit_code",
                 "termination_signal", "termination_source", "start_time", "end_time",
                 "output_bytes", "output_dropped_bytes", "output_note"}


def run_cli(cli: Cli, *command: str, options=(), **kwargs) -> subprocess.CompletedProcess:
    return taskman("run", "--user-id", "client001", "--server-address", cli.server.address,
                   *options, "--", *command, **kwargs)


def start_json(cli: Cli, *command: str, options=("-o", "json")) -> subprocess.CompletedProcess:
    """``taskman start`` with ``options`` before the ``--``."""
    return taskman("start", "--user-id", "client001", "--server-address", cli.server.address,
                   *options, "--", *command)


def start_separate(cli: Cli, *command: str) -> str:
    result = start_json(cli, *command, options=("--separate-streams", "-o", "json"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["task_id"]


def json_status(cli: Cli, task_id: str, user: str = "client001") -> dict:
    result = cli.run("get-status", task_id, "-o", "json", user=user)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_json_ended(cli: Cli, task_id: str, user: str = "client001") -> dict:
    wait_for(lambda: json_status(cli, task_id, user)["status"] != "JOB_STATUS_STARTED",
             timeout=30, message=f"task {task_id} to end")
    return json_status(cli, task_id, user)


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


# -- taskman run

def test_run_prints_each_stream_to_its_descriptor_and_exits_with_the_code(cli):
    result = run_cli(cli, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_run_exits_0_and_keeps_binary_output_exact(cli):
    result = run_cli(cli, "sh", "-c", "printf 'a\\000b\\377'; printf 'x\\001' >&2")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"a\0b\xff", b"x\x01")


def test_run_of_a_signalled_task_exits_128_plus_the_signal(cli):
    result = run_cli(cli, "sh", "-c", "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr


def test_run_against_a_stopped_server_exits_125(start_server):
    server = start_server()
    address = server.address
    assert server.stop() == 0
    result = taskman("run", "--user-id", "client001", "--server-address", address, "--", "true")
    assert result.returncode == 125
    assert b"cannot reach server" in result.stderr and b"Traceback" not in result.stderr


def test_run_failures_of_taskman_exit_125(cli):
    missing = run_cli(cli, "/no/such/command")
    assert missing.returncode == 125 and missing.stderr
    usage = taskman("run", "--user-id", "client001", "--")
    assert usage.returncode == 125 and b"Traceback" not in usage.stderr


def _running_run(cli: Cli, script: str) -> subprocess.Popen:
    """``taskman run -- sh -c script`` whose script first prints "started"."""
    process = subprocess.Popen(
        [*program("taskman"), "run", "--user-id", "client001", "--server-address",
         cli.server.address, "--", "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=program_env())
    assert process.stdout.readline() == b"started\n"
    return process


def _newest_task(cli: Cli) -> dict:
    result = cli.run("list", "--limit", "1", "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ctrl_c_during_run_stops_the_task_and_exits_130(cli):
    process = _running_run(cli, "echo started; sleep 60")
    task_id = _newest_task(cli)["task_id"]
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=30)
    assert process.returncode == 130, errors
    status = json_status(cli, task_id)
    assert status["status"] == "JOB_STATUS_SIGNALED", (status, errors)
    assert status["termination_source"] == "user"
    assert status["termination_signal"] == "SIGTERM"


def test_second_ctrl_c_detaches_at_once_naming_the_task(cli):
    # The task ignores SIGTERM, so the stop waits for the grace (2 s) and SIGKILL.
    process = _running_run(cli, "trap '' TERM; echo started; sleep 60")
    task_id = _newest_task(cli)["task_id"]
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    began = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=30)
    assert process.returncode == 130
    assert time.monotonic() - began < 1.5
    assert task_id.encode() in errors
    wait_json_ended(cli, task_id)  # the first Ctrl-C's stop still happens


# -- JSON output

def check_status_object(status: dict, task_id: str, *, state: str, exit_code, args: list):
    assert set(status) == STATUS_FIELDS
    assert status["task_id"] == task_id
    assert status["owner"] == "client001"
    assert status["command"] == "sh"
    assert status["args"] == args
    assert isinstance(status["process_id"], int) and status["process_id"] > 0
    assert status["status"] == state
    assert status["exit_code"] == exit_code
    assert parse_time(status["start_time"]).tzinfo is not None
    assert status["start_time"].endswith("Z")
    assert status["output_dropped_bytes"] == 0 and status["output_note"] is None


def test_json_output_of_every_command(cli):
    args = ["-c", "echo hello; exit 4"]
    started = start_json(cli, "sh", *args)
    assert started.returncode == 0, started.stderr
    task_id = json.loads(started.stdout)["task_id"]
    assert json.loads(started.stdout) == {"task_id": task_id}

    status = wait_json_ended(cli, task_id)
    check_status_object(status, task_id, state="JOB_STATUS_EXITED_ERROR", exit_code=4, args=args)
    assert status["termination_signal"] is None and status["termination_source"] is None
    assert parse_time(status["end_time"]) >= parse_time(status["start_time"])
    assert status["output_bytes"] == len("hello\n")

    listed = cli.run("list", "-o", "json", "--limit", "5")
    lines = listed.stdout.decode().splitlines()
    assert listed.returncode == 0 and 1 <= len(lines) <= 5
    objects = [json.loads(line) for line in lines]
    assert objects[0] == status  # newest first, the same fields as get-status

    running = start_json(cli, "sh", "-c", "sleep 60", options=("--output", "json"))
    running_id = json.loads(running.stdout)["task_id"]
    alive = json_status(cli, running_id)
    assert alive["status"] == "JOB_STATUS_STARTED"
    assert alive["exit_code"] is None and alive["end_time"] is None
    stopped = cli.run("stop", running_id, "-o", "json")
    assert stopped.returncode == 0, stopped.stderr
    final = json.loads(stopped.stdout)
    check_status_object(final, running_id, state="JOB_STATUS_SIGNALED",
                        exit_code=final["exit_code"], args=["-c", "sleep 60"])
    assert (final["termination_signal"], final["termination_source"]) == ("SIGTERM", "user")

    ran = run_cli(cli, "sh", "-c", "echo out; exit 5", options=["-o", "json"])
    assert ran.returncode == 5 and ran.stdout == b"out\n"
    last = json.loads(ran.stderr.decode().splitlines()[-1])
    check_status_object(last, last["task_id"], state="JOB_STATUS_EXITED_ERROR", exit_code=5,
                        args=["-c", "echo out; exit 5"])


def test_unknown_output_format_is_a_usage_error(cli):
    result = cli.run("list", "-o", "yaml")
    assert result.returncode == 2 and b"--output" in result.stderr


# -- output views

def test_stdout_and_stderr_views_are_each_byte_exact(cli):
    task_id = start_separate(cli, "sh", "-c", INTERLEAVED)
    wait_json_ended(cli, task_id)
    assert cli.run("stream", task_id, "--stdout").stdout == EXPECTED_OUT
    assert cli.run("stream", task_id, "--stderr").stdout == EXPECTED_ERR
    whole = cli.run("stream", task_id).stdout
    assert sorted(whole.splitlines()) == sorted((EXPECTED_OUT + EXPECTED_ERR).splitlines())
    # Each stream's own order survives in the combined view.
    assert b"".join(line + b"\n" for line in whole.splitlines()
                    if line.startswith(b"out")) == EXPECTED_OUT


def test_a_task_started_the_rfds_way_streams_unchanged(cli):
    task_id = cli.start_id("client001", "sh", "-c", "echo a; echo b >&2; echo c")
    wait_json_ended(cli, task_id)
    assert cli.run("stream", task_id).stdout == b"a\nb\nc\n"
    # One shared pipe: its output is neither stdout nor stderr.
    assert cli.run("stream", task_id, "--stdout").stdout == b""


def test_tail_on_a_finished_and_a_live_task(cli):
    finished = cli.start_id("client001", "seq", "1", "100")
    wait_json_ended(cli, finished)
    assert cli.run("stream", finished, "--tail", "3").stdout == b"98\n99\n100\n"
    assert cli.run("stream", finished, "--tail", "1000").stdout.count(b"\n") == 100

    live = cli.start_id("client001", "sh", "-c", "seq 1 5; sleep 60")
    wait_for(lambda: cli.run("stream", live, "--no-follow").stdout == b"1\n2\n3\n4\n5\n")
    assert cli.run("stream", live, "--tail", "2", "--no-follow").stdout == b"4\n5\n"
    cli.run("stop", live)


def test_since_on_a_live_and_a_finished_task(cli):
    task_id = cli.start_id("client001", "sh", "-c", "echo early; sleep 1.5; echo late; sleep 60")
    wait_for(lambda: cli.run("stream", task_id, "--no-follow").stdout == b"early\nlate\n")
    # Halfway between the two lines' own times (1.5 s apart), however slowly
    # a loaded host ran this test's polls.
    stamped = cli.run("stream", task_id, "--timestamps", "--no-follow").stdout.decode()
    early, late = (parse_time(line.split(" ", 1)[0]) for line in stamped.splitlines())
    assert late - early >= datetime.timedelta(seconds=1), stamped
    since = (early + (late - early) / 2).astimezone(datetime.timezone.utc).isoformat()
    since = since.replace("+00:00", "Z")
    assert cli.run("stream", task_id, "--since", since, "--no-follow").stdout == b"late\n"
    assert cli.run("stream", task_id, "--since", "1h", "--no-follow").stdout == b"early\nlate\n"
    cli.run("stop", task_id)
    wait_json_ended(cli, task_id)
    assert cli.run("stream", task_id, "--since", since).stdout == b"late\n"
    assert cli.run("stream", task_id, "--since", "2000-01-01T00:00:00+00:00").stdout == \
        b"early\nlate\n"
    bad = cli.run("stream", task_id, "--since", "yesterday")
    assert bad.returncode == 2 and b"--since" in bad.stderr


def test_no_follow_on_a_live_task_returns_at_once(cli):
    task_id = cli.start_id("client001", "sh", "-c", "echo ready; sleep 60")
    wait_for(lambda: cli.run("stream", task_id, "--no-follow").stdout == b"ready\n")
    began = time.monotonic()
    result = cli.run("stream", task_id, "--no-follow", timeout=20)
    assert result.returncode == 0 and result.stdout == b"ready\n"
    assert time.monotonic() - began < 5  # the CLI's own start-up included
    cli.run("stop", task_id)


def test_timestamps_prefix_every_line_in_order(cli):
    task_id = start_separate(cli, "sh", "-c", INTERLEAVED)
    wait_json_ended(cli, task_id)
    result = cli.run("stream", task_id, "--timestamps")
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 80
    stamps = [parse_time(line.split(" ", 1)[0]) for line in lines]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert stamps == sorted(stamps)
    status = json_status(cli, task_id)
    assert parse_time(status["start_time"]) <= stamps[0]
    assert stamps[-1] <= parse_time(status["end_time"])
    plain = cli.run("stream", task_id).stdout.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == plain


def test_offset_resumes_exactly(cli):
    task_id = cli.start_id("client001", "sh", "-c",
                           "head -c 300000 /dev/urandom | od -An -tx1 -v")
    wait_json_ended(cli, task_id)
    whole = cli.run("stream", task_id).stdout
    assert len(whole) > 5 * 65536
    for offset in (0, 1, 65535, 65536, 200001, len(whole) - 1, len(whole), len(whole) + 10):
        part = cli.run("stream", task_id, "--offset", str(offset)).stdout
        assert part == whole[offset:], offset


def test_a_follower_goes_on_from_its_offset_across_a_server_restart(start_server):
    server = start_server()
    cli = Cli(server)
    # Finished, so the restart (which stops running tasks) leaves it as it is.
    task_id = cli.start_id("client001", "sh", "-c", "head -c 30000000 /dev/zero | tr '\\0' x;"
                           "seq 1 100000")
    wait_json_ended(cli, task_id)
    whole_size = json_status(cli, task_id)["output_bytes"]
    follower = cli.follow(task_id)
    first = follower.stdout.read(1 << 20)  # then stop reading: the stream stalls
    assert server.stop() == 0
    server.command[server.command.index("127.0.0.1:0")] = server.address
    server.start()
    rest, errors = follower.communicate(timeout=120)
    assert follower.returncode == 0, errors
    output = first + rest
    assert len(output) == whole_size
    assert output == b"x" * 30000000 + "".join(f"{i}\n" for i in range(1, 100001)).encode()
    assert b"reconnecting from offset" in errors


# -- tables, versions, errors

def test_control_characters_are_escaped_in_tables(cli):
    task_id = cli.start_id("client002", "sh", "-c", "true\necho \x1b[31mred")
    wait_json_ended(cli, task_id, "client002")
    result = cli.run("list", "--limit", "1", user="client002")
    lines = result.stdout.decode().split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # header, rule, one row
    assert "\x1b" not in result.stdout.decode()
    assert "\\x1b[31mred'" in lines[2]
    # JSON keeps the text exact.
    assert json_status(cli, task_id, user="client002")["args"] == \
        ["-c", "true\necho \x1b[31mred"]


def test_every_table_cell_escapes_control_characters():
    from taskman.cli.formats import format_table

    table = format_table(("A", "B"), [("x\ny", "\x1b[2J\t\u202e")])
    assert table.split("\n")[2] == "x\\ny  \\x1b[2J\\t\\u202e"
    assert format_table(("A",), [("caf\u00e9 \u4e2d",)]).endswith("caf\u00e9 \u4e2d")


def test_versions(cli):
    from taskman.client import TaskmanClient
    from taskman.defaults import version

    for name in ("taskman", "taskman-server"):
        result = subprocess.run([*program(name), "--version"], capture_output=True,
                                env=program_env(), timeout=60)
        assert result.returncode == 0
        assert result.stdout.decode() == f"{name} {version()}\n"
    with TaskmanClient(cli.server.address, "client001") as client:
        assert client.server_version() == version()


def test_an_unknown_selector_is_invalid_argument(cli):
    import grpc

    from taskman.api import task_manager_pb2
    from taskman.client import TaskmanClient

    task_id = cli.start_id("client001", "true")
    with TaskmanClient(cli.server.address, "client001") as client:
        call = client._stub.StreamTaskOutput(
            task_manager_pb2.StreamTaskOutputRequest(task_id=task_id, selector=7), timeout=20)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        headers = dict(call.initial_metadata())
        assert headers.get("taskman-version")


def test_completion_scripts(cli, tmp_path):
    bash = taskman("completion", "bash")
    assert bash.returncode == 0 and b"complete -F _taskman taskman" in bash.stdout
    assert subprocess.run(["bash", "-n"], input=bash.stdout).returncode == 0
    task_id = cli.start_id("client001", "true")
    # The task ids come from list -o json for the --user-id on the line.
    words = f"taskman get-status --user-id client001 --server-address {cli.server.address} "
    script = bash.stdout.decode() + (
        f"\nCOMP_WORDS=({words} '')\nCOMP_CWORD={len(words.split())}\n_taskman\n"
        "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    wrapper = tmp_path / "taskman"  # the script calls taskman by name
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(program("taskman")) + ' "$@"\n')
    wrapper.chmod(0o755)
    env = program_env()
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    shown = subprocess.run(["bash", "-c", script], capture_output=True, env=env, timeout=60)
    assert task_id in shown.stdout.decode().split(), shown
    zsh = taskman("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith(b"#compdef taskman\n")
    assert taskman("completion", "fish").returncode == 2


@pytest.fixture
def server_cli(server):
    return Cli(server)


def test_server_stays_compatible_with_a_plain_stream(server_cli):
    """An RFD client (task_id only) gets the RFD's bytes, now labelled."""
    from taskman.client import TaskmanClient

    task_id = start_separate(server_cli, "sh", "-c", "echo a; echo b >&2")
    wait_json_ended(server_cli, task_id)
    with TaskmanClient(server_cli.server.address, "client001") as client:
        chunks = list(client.chunks(task_id))
    assert sorted(b"".join(chunk.data for chunk in chunks).splitlines()) == [b"a", b"b"]
    assert {chunk.stream for chunk in chunks} == {"stdout", "stderr"}
    offsets = [chunk.offset for chunk in chunks]
    assert offsets[0] == 0
    assert all(chunk.end == after.offset for chunk, after in zip(chunks, chunks[1:], strict=False))
    assert all(chunk.time is not None for chunk in chunks)

