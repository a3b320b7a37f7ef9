"""Durable tasks through the real server and CLI: restarts, crashes, listing,
retention and the output cap."""

import glob
import os
import signal
import subprocess

from server_harness import Cli, Server, parse_status_table, wait_for

from support import process_running


def restarted(first: Server, *options: str) -> Server:
    """A new server on the first one's state directory and cgroup root."""
    second = Server(first.workdir, *options)
    root = first.command[first.command.index("--cgroup-root") + 1]
    second.command[second.command.index("--cgroup-root") + 1] = root
    return second.start()


def cgroup_dirs(task_id: str) -> list:
    """The task's cgroup directories, wherever the driver put them."""
    found = []
    for depth in range(1, 6):
        found += glob.glob("/sys/fs/cgroup/" + "*/" * depth + task_id)
    return found


def test_finished_tasks_answer_the_same_after_a_clean_restart(start_server):
    first = start_server()
    cli = Cli(first)
    ok = cli.start_id("client001", "sh", "-c", "printf 'out\\000bin'; echo err >&2")
    bad = cli.start_id("client002", "sh", "-c", "exit 3")
    before = {task: cli.wait_ended(task, user) for task, user in
              ((ok, "client001"), (bad, "client002"))}
    output = cli.run("stream", ok).stdout
    assert output == b"out\0binerr\n"
    assert first.stop() == 0

    second = restarted(first)
    try:
        cli = Cli(second)
        assert cli.status_row(ok) == before[ok]
        assert cli.status_row(bad, "client002") == before[bad]
        assert cli.status_row(bad, "admin") == before[bad]
        assert cli.run("get-status", bad, user="client001").returncode == 4  # NOT_FOUND
        assert cli.run("stream", ok).stdout == output
        assert cli.run("stream", ok, user="client002").returncode == 4
    finally:
        assert second.stop() == 0


def test_crash_restart_reports_running_tasks_ended_by_the_server(start_server):
    first = start_server()
    cli = Cli(first)
    task = cli.start_id("client001", "sh", "-c", "echo up; sleep 300 & exec sleep 300")
    wait_for(lambda: _has_output(cli, task), message="the task's first output")
    pid = int(cli.status_row(task)["PID"])
    assert cgroup_dirs(task) or os.environ.get("TASKMAN_TEST_CGROUP_DRIVER") == "none"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    assert process_running(pid)  # nobody ended it: the server just vanished

    second = restarted(first)
    try:
        cli = Cli(second)
        row = cli.status_row(task)
        assert (row["STATUS"], row["SIGNAL"], row["SOURCE"]) == \
            ("JOB_STATUS_SIGNALED", "SIGKILL", "server")
        assert row["END TIME"] != "-"
        wait_for(lambda: not process_running(pid), message="the task's process to be killed")
        wait_for(lambda: not cgroup_dirs(task), message="the task's cgroups to be removed")
        assert cli.run("stream", task).stdout == b"up\n"
    finally:
        assert second.stop() == 0


def _has_output(cli: Cli, task: str) -> bool:
    # The stream of a running task does not end: read it for a second.
    try:
        cli.run("stream", task, timeout=1)
    except subprocess.TimeoutExpired as expired:
        return bool(expired.stdout)
    return True


def list_rows(cli: Cli, user: str, *options: str) -> list:
    result = cli.run("list", *options, user=user)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().rstrip("\n").split("\n")
    header, rule = lines[0], lines[1]
    assert header.split()[:3] == ["TASK", "ID", "OWNER"] and set(rule.replace(" ", "")) == {"-"}
    starts = [header.index(name) for name in ("TASK ID", "OWNER", "START TIME", "PID", "STATUS")]
    return [(line[:starts[1]].strip(), line[starts[1]:starts[2]].strip(),
             line[starts[4]:].split()[0]) for line in lines[2:]]


def test_list_shows_own_tasks_newest_first_admin_sees_all(start_server):
    server = start_server()
    cli = Cli(server)
    a1 = cli.start_id("client001", "true")
    b1 = cli.start_id("client002", "false")
    # a1 and b1 end before a2 starts: the order and the statuses below are settled.
    cli.wait_ended(a1)
    cli.wait_ended(b1, "client002")
    a2 = cli.start_id("client001", "sleep", "300")
    assert list_rows(cli, "client001") == [(a2, "client001", "JOB_STATUS_STARTED"),
                                           (a1, "client001", "JOB_STATUS_EXITED_OK")]
    assert list_rows(cli, "client002") == [(b1, "client002", "JOB_STATUS_EXITED_ERROR")]
    assert [row[0] for row in list_rows(cli, "admin")] == [a2, b1, a1]
    assert [row[0] for row in list_rows(cli, "admin", "--owner", "client002")] == [b1]
    assert [row[0] for row in list_rows(cli, "client002", "--owner", "client001")] == [b1]
    assert [row[0] for row in list_rows(cli, "admin", "--status", "started")] == [a2]
    assert [row[0] for row in list_rows(cli, "admin", "--status", "exited_ok",
                                        "--status", "JOB_STATUS_EXITED_ERROR")] == [b1, a1]
    assert [row[0] for row in list_rows(cli, "admin", "--limit", "1")] == [a2]
    assert cli.run("list", "--status", "bogus").returncode == 2
    assert b"sleep 300" in cli.run("list").stdout


def test_retention_by_age_makes_finished_tasks_not_found(start_server):
    # Long enough that the ended task is seen before it expires, even when each
    # CLI call takes a second on a loaded machine (1 s lost that race).
    cli = Cli(start_server("--retention", "6s"))
    old = cli.start_id("client001", "echo", "old")
    running = cli.start_id("client001", "sleep", "300")
    cli.wait_ended(old)
    wait_for(lambda: cli.run("get-status", old).returncode == 4, timeout=20,
             message="the finished task to expire")
    assert cli.status_row(running)["STATUS"] == "JOB_STATUS_STARTED"


def test_retention_by_disk_budget_removes_the_oldest_first(start_server):
    server = start_server("--output-budget", "3000")
    cli = Cli(server)
    ids = []
    for _ in range(3):
        ids.append(cli.start_id("client001", "head", "-c", "1400", "/dev/zero"))
        cli.wait_ended(ids[-1])
    wait_for(lambda: cli.run("get-status", ids[0]).returncode == 4, timeout=5,
             message="the oldest task to be removed")
    assert [cli.status_row(i)["STATUS"] for i in ids[1:]] == ["JOB_STATUS_EXITED_OK"] * 2
    assert sorted(os.listdir(server.state_dir / "output")) == sorted(i + ".log" for i in ids[1:])


def test_output_cap_keeps_a_marker_and_the_status_says_so(start_server):
    cli = Cli(start_server("--task-output-max", "4K"))
    task = cli.start_id("client001", "head", "-c", "100000", "/dev/zero")
    cli.wait_ended(task)
    output = cli.run("stream", task).stdout
    assert len(output) == 4096
    assert output.endswith(b"[taskman: output cap of 4096 bytes reached; the rest is dropped]\n")
    status = cli.run("get-status", task)
    assert parse_status_table(status.stdout.decode())["STATUS"] == "JOB_STATUS_EXITED_OK"
    kept = output.index(b"\n[taskman")
    assert status.stderr.decode() == \
        f"Note: output over the 4096-byte cap dropped ({100000 - kept} bytes dropped)\n"


def test_list_pages_through_many_tasks_and_cuts_long_args(start_server):
    from taskman.api import task_manager_pb2
    from taskman.client import TaskmanClient

    server = start_server()
    long_args = ["x" * 3000, "y" * 3000]
    with TaskmanClient(server.address, "client001") as client:
        ids = [client.start("true") for _ in range(4)] + [client.start("echo", long_args)]
        seen, token = [], ""
        while True:
            page = client._unary(client._stub.ListTasks, task_manager_pb2.ListTasksRequest(
                limit=2, page_token=token))
            assert len(page.tasks) <= 2
            seen += [task.task_id for task in page.tasks]
            token = page.next_page_token
            if not token:
                break
        assert seen == ids[::-1]
        listed = client.list(limit=1)[0]
        assert listed.task_id == ids[-1] and sum(map(len, listed.args)) < 1100
        assert list(client.status(ids[-1]).args) == long_args  # whole in the status
        assert [t.task_id for t in client.list(limit=3)] == ids[::-1][:3]
        assert [t.task_id for t in client.list()] == ids[::-1]
