"""The server process: the stream limit, start-up failures, clean shutdown."""

import signal
import socket
import subprocess

import gevent
import pytest
from server_harness import Cli, Server, program, program_env

from taskman.client import ClientError, TaskmanClient

pytestmark = pytest.mark.timeout(180)


def test_stream_limit_refuses_the_next_stream_but_not_control_calls(start_server):
    limit = 3
    server = start_server("--max-streams", str(limit))
    cli = Cli(server)
    task_id = cli.start_id("client001", "sh", "-c", "echo ready; exec sleep 60")
    clients = [TaskmanClient(server.address, "client001") for _ in range(limit + 2)]
    streams = []
    try:
        with gevent.Timeout(60):
            for client in clients[:limit]:
                stream = client.stream(task_id)
                assert next(stream) == b"ready\n"  # open and counted
                streams.append(stream)
            with pytest.raises(ClientError) as refused:
                next(clients[limit].stream(task_id))
            assert refused.value.code.name == "RESOURCE_EXHAUSTED"
            assert "too many open output streams" in refused.value.message
            # Control calls still answer while every stream slot is taken.
            assert clients[limit].status(task_id).running
            other = clients[limit].start("true")
            assert clients[limit].status(other).process_id > 0
            # A stream that goes away gives its slot back.
            streams.pop().close()

            def reopened():
                try:
                    stream = clients[limit + 1].stream(task_id)
                    assert next(stream) == b"ready\n"
                    streams.append(stream)
                    return True
                except ClientError as error:
                    assert error.code.name == "RESOURCE_EXHAUSTED"
                    gevent.sleep(0.1)
                    return False

            deadline = gevent.get_hub().loop.now() + 20
            while not reopened():
                assert gevent.get_hub().loop.now() < deadline, "the slot was never released"
            clients[0].stop(task_id)
            for stream in streams:  # every open stream ends with the task
                assert list(stream) == []
    finally:
        for stream in streams:
            stream.close()
        for client in clients:
            client.close()
    assert "code=RESOURCE_EXHAUSTED" in server.log()


def test_sigterm_ends_running_tasks_and_exits_0(start_server):
    server = start_server()
    cli = Cli(server)
    task_id = cli.start_id("client001", "sh", "-c", "echo up; exec sleep 300")
    follower = cli.follow(task_id)
    try:
        assert follower.stdout.readline() == b"up\n"
        assert server.stop() == 0
        rest, errors = follower.communicate(timeout=30)
        assert follower.returncode == 0, errors  # the stream ended with the task
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    log = server.log()
    assert "shutting down" in log and "stopped" in log
    assert f"task {task_id} ended: SIGNALED" in log
    assert "Traceback" not in log


def test_sigint_also_shuts_down_cleanly(tmp_path):
    server = Server(tmp_path).start()
    server.process.send_signal(signal.SIGINT)
    assert server.stop() == 0


def _start_failure(tmp_path, *options):
    """Run a server expected not to start; return (exit status, stderr)."""
    command = [*program("taskman-server"), "--state-dir", str(tmp_path / "state"), *options]
    result = subprocess.run(command, capture_output=True, timeout=60, env=program_env())
    return result.returncode, result.stderr.decode()


def test_port_in_use_is_one_sentence(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, errors = _start_failure(tmp_path, "--server-address", f"127.0.0.1:{port}",
                                        "--cgroup-driver", "none")
    assert status == 1
    assert f"taskman-server: cannot listen on 127.0.0.1:{port}" in errors
    assert "Traceback" not in errors


def test_bad_certificate_path_is_one_sentence(tmp_path):
    status, errors = _start_failure(tmp_path, "--server-address", "127.0.0.1:0",
                                    "--server-cert", str(tmp_path / "missing.crt"))
    assert status == 1
    assert errors == f"taskman-server: cannot read the server certificate " \
                     f"{tmp_path / 'missing.crt'}: No such file or directory\n"


def test_a_key_that_does_not_match_is_refused(tmp_path):
    from taskman import tls

    _, cert, _ = tls.client_files("client001")
    _, _, other_key = tls.client_files("client002")
    status, errors = _start_failure(tmp_path, "--server-address", "127.0.0.1:0",
                                    "--server-cert", cert, "--server-key", other_key)
    assert status == 1 and "invalid server certificate or key" in errors
    assert "Traceback" not in errors


def _driver_this_host_lacks() -> str:
    """hybrid on a pure cgroup v2 host, v2 elsewhere (a hybrid host's unified
    hierarchy has no controllers)."""
    with open("/proc/mounts") as mounts:
        pure_v2 = any(line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in mounts)
    return "hybrid" if pure_v2 else "v2"


def test_unavailable_cgroup_driver_is_one_sentence(tmp_path):
    status, errors = _start_failure(tmp_path, "--server-address", "127.0.0.1:0",
                                    "--cgroup-driver", _driver_this_host_lacks())
    assert status == 1
    assert errors.startswith("taskman-server: cannot set up tasks: ")
    assert errors.count("\n") == 1 and "Traceback" not in errors


@pytest.mark.parametrize("options, message", [
    (["--memory-max", "lots"], "invalid --memory-max 'lots'"),
    (["--io-device", "sda"], "invalid --io-device 'sda'"),
    (["--cgroup-driver", "v3"], "unknown cgroup driver 'v3'"),
    (["--server-address", "nowhere"], "invalid --server-address 'nowhere'"),
    (["--max-streams", "0"], "--max-streams must be an integer of at least 1"),
])
def test_bad_options_exit_2(tmp_path, options, message):
    status, errors = _start_failure(tmp_path, *options)
    assert status == 2
    assert message in errors and "Traceback" not in errors


def test_server_help_extends_the_rfds():
    result = subprocess.run([*program("taskman-server"), "--help"], capture_output=True,
                            timeout=30, env=program_env())
    assert result.returncode == 0
    text = result.stdout.decode()
    for line in ("  --server-address <host:port>",
                 "      The address the gRPC server will listen on (e.g., localhost:50051). "
                 "Defaults to localhost:50051 if not set.",
                 "  $ taskman-server --server-address localhost:12345",
                 "  --max-streams <n>", "  --cgroup-driver <kind>", "  --stop-grace <seconds>"):
        assert line in text.split("\n"), line


def test_client_library_reports_status_codes(server):
    with TaskmanClient(server.address, "client002") as client:
        task_id = client.start("sh", ["-c", "exit 5"])
        deadline = gevent.get_hub().loop.now() + 30
        while client.status(task_id).running:
            assert gevent.get_hub().loop.now() < deadline
            gevent.sleep(0.05)
        status = client.status(task_id)
        assert (status.status, status.exit_code, status.end_time is not None) == \
            ("JOB_STATUS_EXITED_ERROR", 5, True)
        with pytest.raises(ClientError) as missing:
            client.status("a7da14c7-b47a-4535-a263-5bb26e503002")
        assert missing.value.code.name == "NOT_FOUND"
