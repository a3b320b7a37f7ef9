"""Fair sharing on a real server (#16): one user floods, another keeps working.

Each refusal is RESOURCE_EXHAUSTED with the quota's one sentence; health
streams have their own budget; GetUsage; page tokens are no existence
oracle; StopTask never holds a worker; the audit log reopens on SIGUSR1.
Tasks run as unprivileged uids: they use /bin/sh and /usr/bin/python3.
"""

import glob
import json
import os
import signal
import uuid

import gevent
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import Cli, Server, wait_for

from support import fixture
from taskman.api import task_manager_pb2 as pb
from taskman.client import ClientError, TaskmanClient

pytestmark = pytest.mark.timeout(240)



def client(server, user="client001"):
    return TaskmanClient(server.address, user)


def started(client_, *command):
    """Start a task and wait for its first line (so it runs and is counted)."""
    task_id = client_.start(command[0], list(command[1:]))
    stream = client_.stream(task_id)
    next(stream)
    stream.close()
    return task_id


def refused(call) -> ClientError:
    with pytest.raises(ClientError) as error:
        call()
    assert error.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.message
    return error.value


def quiet_user_works(server, user="client002"):
    """The quiet user's start, status, stream and stop all succeed."""
    with client(server, user) as quiet:
        task_id = quiet.start("sh", ["-c", "echo hello; exec sleep 30"])
        stream = quiet.stream(task_id)
        assert next(stream) == b"hello\n"
        assert quiet.status(task_id).running
        status = quiet.stop(task_id)
        assert status is not None and not status.running
        assert list(stream) == []


def test_streams_past_the_user_quota_are_refused_while_another_user_streams(start_server):
    server = start_server("--quota-open-streams", "3", "--max-streams", "64")
    flooder = client(server)
    task_id = started(flooder, "sh", "-c", "echo ready; exec sleep 60")
    streams = []
    try:
        for _ in range(3):
            stream = flooder.stream(task_id)
            assert next(stream) == b"ready\n"
            streams.append(stream)
        error = refused(lambda: next(flooder.stream(task_id)))
        assert error.message == ("quota exceeded: open streams 3 of 3 for client001; close one "
                                 "of your other streams first (--quota-open-streams)")
        quiet_user_works(server)
        # The CLI prints the sentence and exits 6.
        result = Cli(server).run("stream", task_id)
        assert result.returncode == 6, result.stderr
        assert result.stderr.decode().strip() == "taskman: " + error.message
    finally:
        for stream in streams:
            stream.close()
        flooder.stop(task_id, wait=0)
        flooder.close()


def test_health_watch_streams_take_no_task_stream_slot(start_server):
    server = start_server("--max-streams", "2", "--max-health-streams", "2")
    with client(server) as first, client(server, "client002") as second:
        health = health_pb2_grpc.HealthStub(first._channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(2)]
        try:
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # Both health places are taken: a third Watch is refused...
            third = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            with pytest.raises(grpc.RpcError) as error:
                next(third)
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "health and reflection streams" in error.value.details()
            # ...but both output stream places are still free.
            task_id = started(second, "sh", "-c", "echo ready; exec sleep 60")
            streams = [second.stream(task_id) for _ in range(2)]
            assert [next(stream) for stream in streams] == [b"ready\n"] * 2
            for stream in streams:
                stream.close()
            second.stop(task_id, wait=0)
        finally:
            for watch in watches:
                watch.cancel()


def test_many_slow_stops_do_not_hold_workers(tmp_path):
    server = Server(tmp_path / "server")
    server.command[server.command.index("--stop-grace") + 1] = "30"  # the harness says 2
    server.start()
    try:
        _slow_stops(server)
    finally:
        assert server.stop() == 0, server.log()


def _slow_stops(server):
    flooder = client(server)
    task_id = started(flooder, fixture("unkillable.sh"))
    stops = [gevent.spawn(flooder.stop, task_id, 0) for _ in range(40)]
    gevent.joinall(stops, timeout=60)
    # Every StopTask returned at once, though the task ignores SIGTERM for 30 s.
    assert all(stop.successful() for stop in stops), [stop.exception for stop in stops]
    assert flooder.status(task_id).running
    # A client that waits polls the status instead; meanwhile, other users answer.
    waiting = [gevent.spawn(flooder.stop, task_id, 60) for _ in range(40)]
    gevent.sleep(0.5)
    with client(server, "client002") as quiet:
        other = quiet.start("true")
        assert quiet.status(other).task_id == other
    assert not any(stop.ready() for stop in waiting)  # answered while the stops still wait
    quiet_user_works(server)
    # The CLI's --no-wait returns at once with the RFD's sentence.
    result = Cli(server).run("stop", task_id, "--no-wait")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"Task {task_id} stop request received.\n"
    gevent.joinall(waiting, timeout=90)
    assert all(not stop.value.running for stop in waiting)
    flooder.close()


def test_fork_bomb_memory_hog_and_output_flood_leave_another_user_working(start_server):
    server = start_server("--pids-max", "64", "--memory-max", "64M",
                          "--task-output-max", "1M")
    flooder = client(server)
    bomb = flooder.start("sh", ["-c", "b() { b | b & }; b; sleep 5"])
    hog = flooder.start("/usr/bin/python3", ["-c", "x = bytearray(1 << 30)"])
    flood = flooder.start("sh", ["-c", "yes flood | head -c 50000000"])
    quiet_user_works(server)
    for task_id in (hog, flood):
        wait_for(lambda task_id=task_id: not flooder.status(task_id).running, 60, "ended")
    assert flooder.status(hog).termination_signal == "SIGKILL"
    assert flooder.status(flood).output_dropped_bytes > 0
    flooder.stop(bomb)
    flooder.close()


def test_tasks_past_the_running_quota_and_huge_arguments_are_refused(start_server):
    server = start_server("--quota-running-tasks", "2", "--quota-argument-bytes", "64K")
    with client(server) as flooder:
        tasks = [flooder.start("sleep", ["30"]) for _ in range(2)]
        error = refused(lambda: flooder.start("sleep", ["30"]))
        assert error.message == ("quota exceeded: running tasks 2 of 2 for client001; stop or "
                                 "wait for some to end (--quota-running-tasks)")
        error = refused(lambda: flooder.start("true", ["x" * 70_000]))
        assert error.message.startswith("quota exceeded: argument bytes per task ")
        quiet_user_works(server)
        for task_id in tasks:
            flooder.stop(task_id, wait=0)


def test_get_usage_for_oneself_and_as_admin(start_server):
    server = start_server("--quota-open-streams", "5")
    with client(server) as own, client(server, "admin") as admin:
        task_id = started(own, "sh", "-c", "echo ready; exec sleep 60")
        stream = own.stream(task_id)
        next(stream)
        [(user, quotas)] = own.usage()
        assert user == "client001"
        by_name = {quota.name: quota for quota in quotas}
        assert by_name["open streams"].used == 1 and by_name["open streams"].limit == 5
        assert by_name["open streams"].option == "--quota-open-streams"
        assert by_name["running tasks"].used == 1
        assert by_name["calls in flight"].used == 1  # this very call
        with pytest.raises(ClientError) as error:
            own.usage(user="client002")
        assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ClientError):
            own.usage(all_users=True)
        [(user, _)] = admin.usage(user="client001")
        assert user == "client001"
        assert {user for user, _ in admin.usage(all_users=True)} >= {"admin", "client001"}
        # The CLI: a table, and JSON.
        cli = Cli(server)
        table = cli.run("usage").stdout.decode().splitlines()
        assert table[0].split() == ["QUOTA", "USED", "LIMIT", "OPTION"]
        assert any(line.split()[:2] == ["open", "streams"] and line.split()[2:4] == ["1", "5"]
                   for line in table), table
        result = cli.run("usage", "--all", "-o", "json", user="admin")
        assert result.returncode == 0, result.stderr
        users = [json.loads(line)["user"] for line in result.stdout.decode().splitlines()]
        assert "client001" in users
        result = cli.run("usage", "--user", "client002")
        assert result.returncode == 3, result.stderr
        stream.close()
        own.stop(task_id, wait=0)


def test_page_tokens_are_bound_to_the_caller_and_no_oracle(start_server):
    server = start_server()
    with client(server) as own, client(server, "client002") as other:
        mine = [own.start("true") for _ in range(3)]
        theirs = other.start("true")

        def list_page(stub_client, token, limit=1):
            return stub_client._stub.ListTasks(pb.ListTasksRequest(limit=limit, page_token=token),
                                               timeout=30)

        first = list_page(own, "")
        assert first.next_page_token and first.next_page_token not in mine
        assert list_page(own, first.next_page_token).tasks[0].task_id in mine
        answers = []
        for token in (theirs, str(uuid.uuid4()), mine[0], "%%%", first.next_page_token):
            caller = other if token == first.next_page_token else own
            with pytest.raises(grpc.RpcError) as error:
                list_page(caller, token)
            answers.append((error.value.code(), error.value.details()))
        # Another user's task id, a random id, one's own raw id, garbage and
        # another caller's token: one answer.
        assert len(set(answers)) == 1, answers
        assert answers[0][0] is grpc.StatusCode.INVALID_ARGUMENT
        assert len(own.list()) == 3  # paging through the tokens still works


def test_audit_log_reopens_on_sigusr1_without_losing_records(start_server):
    server = start_server()
    path = server.state_dir / "audit.log"
    moved = server.state_dir / "audit.log.1"

    def call_recorded(task_id):
        # A call's own record is written once its reply is out: wait for it,
        # not only for the task's start event the call wrote before replying.
        whole = path.read_text().split("\n")[:-1]  # not a line still being written
        return any(record.get("method") == "StartTask" and record.get("task_id") == task_id
                   for record in map(json.loads, whole))

    with client(server) as own:
        before = own.start("true")
        wait_for(lambda: call_recorded(before), 10, "the first call's record")
        os.rename(path, moved)
        during = own.start("true")  # still goes to the moved file
        server.process.send_signal(signal.SIGUSR1)
        wait_for(lambda: path.exists(), 10, "a new audit log")
        after = own.start("true")
        wait_for(lambda: call_recorded(after), 10, "the call's record after the reopen")
    old = [json.loads(line) for line in moved.read_text().splitlines()]  # whole records
    new = [json.loads(line) for line in path.read_text().splitlines()]

    def started_in(records):
        return [r["task_id"] for r in records if r["event"] == "task.started"]

    assert started_in(old) == [before, during]
    assert started_in(new) == [after]
    # Each call recorded once, in one file or the other: none lost, none twice.
    calls = [r["task_id"] for r in old + new if r.get("method") == "StartTask"]
    assert calls == [before, during, after]
    assert "audit log reopened" in server.log()


def test_page_token_reading_is_one_sentence_for_every_bad_token():
    from taskman.errors import InvalidArgument
    from taskman.page_tokens import INVALID_TOKEN, PageTokens

    tokens = PageTokens()
    task_id = str(uuid.uuid4())
    token = tokens.make("client001", task_id)
    assert tokens.read("client001", token) == task_id
    for caller, bad in (("client002", token), ("client001", task_id), ("client001", "x" * 999),
                        ("client001", token[:-4]), ("client001", PageTokens().make("client001",
                                                                                  task_id))):
        with pytest.raises(InvalidArgument) as error:
            tokens.read(caller, bad)
        assert str(error.value) == INVALID_TOKEN


# -- per-user slices, read back from the kernel's files

PYTHON = "/usr/bin/python3"  # tasks run as other uids: never the test's own interpreter
MiB = 1 << 20


def slice_of(server, task_id: str, controller: str = "memory") -> str:
    """The user slice holding the task's group in a v1 ``controller``
    hierarchy (under the server's cgroup root there); skips without one."""
    root = server.command[server.command.index("--cgroup-root") + 1]
    found = []
    for depth in range(0, 6):
        found += glob.glob(os.path.join("/sys/fs/cgroup", controller, *["*"] * depth, root,
                                        "user-*", task_id))
    if not found:
        pytest.skip(f"no v1 {controller} hierarchy holds the task's group on this host")
    [directory] = found
    return os.path.dirname(directory)


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Uid:")).split()[1])


def read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as file:
        return file.read().strip()


def test_the_user_slice_limit_is_in_the_cgroup_files(start_server):
    server = start_server("--user-memory-max", "512M")
    with client(server) as own:
        task_id = started(own, "sh", "-c", "echo ready; exec sleep 60")
        user_slice = slice_of(server, task_id)
        uid = uid_of(own.status(task_id).process_id)
        assert os.path.basename(user_slice) == f"user-{uid}" and uid != 0
        assert int(read(user_slice, "memory.limit_in_bytes")) == 512 * MiB
        own.stop(task_id)


def test_two_tasks_that_fit_alone_but_not_in_the_user_slice_one_is_oom_killed(start_server):
    server = start_server("--user-memory-max", "512M")
    hog = "b = bytearray(400 << 20); print('allocated', flush=True); import time; time.sleep(5)"
    with client(server) as own:
        tasks = [own.start(PYTHON, ["-c", hog]) for _ in range(2)]
        for task_id in tasks:
            wait_for(lambda task_id=task_id: not own.status(task_id).running, 90, "ended")
        ends = sorted(((own.status(task_id).status, own.status(task_id).termination_signal,
                        own.status(task_id).termination_source) for task_id in tasks))
        assert ends == [("JOB_STATUS_EXITED_OK", "", ""),
                        ("JOB_STATUS_SIGNALED", "SIGKILL", "oom")], ends
