"""Several --server-address values: unary calls pass over addresses that
refuse or never answer, and the failure names them all when none answers."""

import socket
import time

import pytest
from server_harness import taskman

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def refused():
    """A loopback address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def silent():
    """A loopback address that accepts TCP but never speaks (a hung host)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield "127.0.0.1:%d" % listener.getsockname()[1]


def run(command, *args, addresses):
    return taskman(command, *args, "--user-id", "client001", "--server-address",
                   ",".join(addresses))


def test_start_and_status_go_past_a_refusing_address(server, refused):
    started = taskman("start", "--user-id", "client001", "--server-address",
                      f"{refused},{server.address}", "--", "true")
    assert started.returncode == 0, started.stderr.decode()
    task_id = started.stdout.decode().split()[-1]
    status = run("get-status", task_id, "-o", "json", addresses=[refused, server.address])
    assert status.returncode == 0, status.stderr.decode()
    assert task_id in status.stdout.decode()


def test_an_address_that_never_answers_costs_the_connect_bound(server, silent):
    from taskman.client import CONNECT_TIMEOUT

    began = time.monotonic()
    listed = run("list", "--limit", "1", addresses=[silent, server.address])
    took = time.monotonic() - began
    assert listed.returncode == 0, listed.stderr.decode()
    # grpc's own connect timeout is 20 s; the bound is CONNECT_TIMEOUT.
    assert took < CONNECT_TIMEOUT + 10, took


def test_stream_and_run_go_past_a_refusing_address(server, refused):
    result = taskman("run", "--user-id", "client001", "--server-address",
                     f"{refused},{server.address}", "--", "sh", "-c", "echo out; exit 3")
    assert result.returncode == 3, result.stderr.decode()
    assert result.stdout == b"out\n"


def test_when_no_address_answers_the_error_names_them_all(refused):
    other = refused.rsplit(":", 1)[0] + ":1"
    result = run("get-status", "0" * 8, addresses=[refused, other])
    assert result.returncode == 7, result.stderr.decode()
    errors = result.stderr.decode()
    assert f"cannot reach any of the servers at {refused}, {other}" in errors, errors
    assert "Traceback" not in errors


@pytest.mark.parametrize("address", ["a:1,,b:2", ",", " "])
def test_an_empty_address_in_the_list_is_a_usage_error(address):
    result = taskman("get-status", "x", "--user-id", "client001", "--server-address", address)
    assert result.returncode == 2, result.stderr.decode()
    assert b"invalid server address" in result.stderr
