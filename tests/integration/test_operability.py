"""Operability, through the real server: health checking, reflection, the
audit trail, metrics, ``taskman-server --check`` and the systemd unit."""

import json
import re
import shutil
import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import REPO, Cli, program, program_env, session_pki, wait_for

from support import CallAborted, FakeCallContext
from taskman import tls
from taskman.api import task_manager_pb2, task_manager_pb2_grpc

pytestmark = pytest.mark.timeout(120)

SERVICE = "task_manager.TaskManager"
UNKNOWN = "a7da14c7-b47a-4535-a263-5bb26e503002"
SECRET = "sk_live_7f3c9a1e5b2d4c6a8e0f"  # what a task might print; never audited
UNIT = REPO / "contrib" / "taskman-server.service"


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A server with metrics on a kernel-chosen loopback port and an audit
    log outside its state directory (the option, not the default)."""
    from server_harness import Server

    workdir = tmp_path_factory.mktemp("observed")
    audit = workdir / "audit" / "audit.jsonl"
    instance = Server(workdir, "--metrics-address", "127.0.0.1:0",
                      "--audit-log", str(audit)).start()
    instance.audit_path = audit
    instance.metrics_url = re.search(r"metrics on (http://\S+/metrics)", instance.log()).group(1)
    yield instance
    status = instance.stop()
    assert status == 0, f"taskman-server exited with {status}:\n{instance.log()}"


def _channel(server, user="client001", cert=True):
    ca, cert_path, key = tls.client_files(user)
    if cert:
        credentials = tls.channel_credentials(ca, cert_path, key)
    else:  # trusts the server, presents nothing
        with open(ca, "rb") as file:
            credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
    return grpc.secure_channel(server.address, credentials,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def _audit(server) -> list:
    with open(server.audit_path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def _calls(server, method: str) -> list:
    return [record for record in _audit(server)
            if record["event"] == "call" and record["method"] == method]


def _scrape(server) -> dict:
    """The metrics page as {'name{labels}': value}."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# -- the version header

def _versions(call) -> list:
    return [value for key, value in call.initial_metadata() if key == "taskman-version"]


def test_every_kind_of_response_carries_the_version_header_once(observed):
    """Replies, refusals, health checks and streams: the header is in each
    call's initial metadata exactly once (grpcio sends it with the reply)."""
    from taskman.defaults import version

    with _channel(observed) as channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        started, call = stub.StartTask.with_call(
            task_manager_pb2.StartTaskRequest(command="true"), timeout=10)
        calls = [call]
        _, call = stub.GetTaskStatus.with_call(
            task_manager_pb2.TaskStatusRequest(task_id=started.task_id), timeout=10)
        calls.append(call)
        _, call = health.Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
        calls.append(call)
        for refused in (lambda: stub.GetTaskStatus.with_call(
                            task_manager_pb2.TaskStatusRequest(task_id=UNKNOWN), timeout=10),
                        lambda: stub.StartTask.with_call(task_manager_pb2.StartTaskRequest(),
                                                         timeout=10),
                        lambda: health.Check.with_call(
                            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)):
            with pytest.raises(grpc.RpcError) as raised:
                refused()
            calls.append(raised.value)
        stream = stub.StreamTaskOutput(
            task_manager_pb2.StreamTaskOutputRequest(task_id=started.task_id), timeout=10)
        list(stream)
        calls.append(stream)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        next(watch)
        calls.append(watch)
        watch.cancel()
    assert [_versions(call) for call in calls] == [[version()]] * len(calls)


def test_grpcio_sends_the_version_in_the_replys_own_batch():
    """On the grpcio this runs with, the header needs no batch of its own
    (if a release drops the hook, the guard sends it explicitly: slower)."""
    from taskman import guard

    assert guard.send_version_with_replies()


# -- health checking and reflection

def test_health_check_is_serving_over_mtls(observed):
    with _channel(observed) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_the_status(observed):
    with _channel(observed) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_health_without_a_client_certificate_is_refused_at_the_handshake(observed):
    with _channel(observed, cert=False) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
    # The handshake fails, so no call reaches the server: UNAVAILABLE, not a status.
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_the_services(observed):
    with _channel(observed) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
        answers = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in answers[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # enough for grpcurl
    calls = _calls(observed, "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert calls and calls[-1]["user"] == "client001" and calls[-1]["code"] == "OK"


# -- the audit trail

def test_audit_records_a_started_task_with_its_command_line(observed):
    cli = Cli(observed)
    task_id = cli.start_id("client001", "sh", "-c", f"echo {SECRET}; echo {SECRET} >&2")
    assert cli.wait_ended(task_id)["STATUS"] == "JOB_STATUS_EXITED_OK"
    assert SECRET in cli.run("stream", task_id).stdout.decode()

    def ended():
        return [r for r in _audit(observed) if r.get("task_id") == task_id
                and r["event"] == "task.ended"]

    wait_for(ended, message="the task.ended record")
    records = [r for r in _audit(observed) if r.get("task_id") == task_id]
    start = next(r for r in records if r["event"] == "call" and r["method"] == "StartTask")
    assert start["user"] == "client001" and start["code"] == "OK"
    assert start["peer"].startswith("ipv4:127.0.0.1:") and start["duration_ms"] >= 0
    started = next(r for r in records if r["event"] == "task.started")
    assert started["owner"] == "client001" and started["command"] == "sh"
    assert started["args"] == ["-c", f"echo {SECRET}; echo {SECRET} >&2"]
    assert ended()[0]["status"] == "EXITED_OK" and ended()[0]["exit_code"] == 0
    stream = [r for r in records if r["event"] == "call" and r["method"] == "StreamTaskOutput"]
    assert stream and stream[-1]["code"] == "OK"
    # The command line is audited, the output never: only the two args carry
    # the string, however many times the task printed it.
    text = observed.audit_path.read_text()
    assert text.count(SECRET) == 2 * sum(1 for r in records if r["event"] == "task.started")


def test_audit_records_refused_calls(observed):
    cli = Cli(observed)
    task_id = cli.start_id("client001", "sleep", "30")
    try:
        assert cli.run("get-status", task_id, user="client002").returncode != 0
        with _channel(observed) as channel:
            with pytest.raises(grpc.RpcError):
                task_manager_pb2_grpc.TaskManagerStub(channel).StartTask(
                    task_manager_pb2.StartTaskRequest(command=""), timeout=10)
    finally:
        cli.run("stop", task_id)
    # `taskman stop` polls the status as client001 too: pick the refusal.
    refused = [r for r in _calls(observed, "GetTaskStatus")
               if r.get("task_id") == task_id and r["code"] != "OK"]
    assert refused[-1]["user"] == "client002" and refused[-1]["code"] == "NOT_FOUND"
    assert refused[-1]["detail"]  # the reason the caller was given
    invalid = [r for r in _calls(observed, "StartTask") if r["code"] == "INVALID_ARGUMENT"]
    assert invalid and invalid[-1]["user"] == "client001"
    stop_calls = [r for r in _calls(observed, "StopTask") if r.get("task_id") == task_id]
    assert stop_calls[-1]["code"] == "OK"
    stopping = wait_for(lambda: [r for r in _audit(observed) if r.get("task_id") == task_id
                                 and r["event"] == "task.stopping"], message="task.stopping")
    assert stopping[0]["cause"] == "user"
    ended = wait_for(lambda: [r for r in _audit(observed) if r.get("task_id") == task_id
                              and r["event"] == "task.ended"], message="task.ended")
    assert ended[0]["status"] == "SIGNALED" and ended[0]["cause"] == "user"


def test_audit_records_the_server_start_with_its_tls_self_test(observed):
    start = [r for r in _audit(observed) if r["event"] == "server.start"]
    assert start and "TLS 1.2" in start[0]["tls_self_test"]
    assert start[0]["address"] == observed.address


def test_audit_log_defaults_to_the_state_directory(server):
    Cli(server).run("get-status", UNKNOWN)
    path = server.state_dir / "audit.log"
    assert (path.stat().st_mode & 0o777) == 0o600
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(r["event"] == "call" and r["code"] == "NOT_FOUND" for r in records)


# -- metrics

def test_metrics_are_off_by_default(server):
    assert "metrics on" not in server.log()


def test_metrics_move_when_a_task_runs(observed):
    before = _scrape(observed)
    cli = Cli(observed)
    task_id = cli.start_id("client001", "sh", "-c", "head -c 100000 /dev/zero")
    assert cli.wait_ended(task_id)["STATUS"] == "JOB_STATUS_EXITED_OK"
    assert len(cli.run("stream", task_id).stdout) == 100000

    def moved():
        after = _scrape(observed)
        ended = 'taskman_tasks_ended_total{source="none",status="EXITED_OK"}'
        if after.get(ended, 0) - before.get(ended, 0) >= 1:
            return after
        return None

    after = wait_for(moved, message="the ended counter")
    assert after["taskman_tasks_started_total"] - before["taskman_tasks_started_total"] == 1
    assert (after["taskman_stream_bytes_total"]
            - before.get("taskman_stream_bytes_total", 0)) >= 100000
    assert after["taskman_tasks_running"] == 0
    assert after["taskman_streams_active"] == 0
    assert after['taskman_rpc_duration_seconds_count{code="OK",method="StartTask"}'] >= 1
    assert "process_resident_memory_bytes" in after


# -- taskman-server --check

def _check(*options):
    return subprocess.run([*program("taskman-server"), "--check", *options],
                          capture_output=True, timeout=60, env=program_env())


def test_check_passes_with_the_default_settings(tmp_path):
    result = _check()
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert [line.split(":")[0] for line in lines if line.startswith(("OK", "FAIL"))] == [
        "OK   certificates", "OK   cgroup driver", "OK   state directory", "OK   audit log",
        "OK   quotas", "OK   sandbox", "OK   file modes"]


def test_check_fails_with_a_bad_certificate_path(tmp_path):
    result = _check("--server-cert", str(tmp_path / "missing.crt"),
                    "--state-dir", str(tmp_path / "state"))
    out = result.stdout.decode()
    assert result.returncode == 1, out
    assert re.search(r"^FAIL certificates: .*missing\.crt", out, re.MULTILINE), out
    assert not (tmp_path / "state").exists()  # --check creates nothing


def test_check_fails_when_the_ca_did_not_sign_the_server_certificate(tmp_path):
    result = _check("--ca-cert", str(tls.client_files("client001")[1]))
    assert result.returncode == 1
    assert "FAIL certificates:" in result.stdout.decode()


def test_check_beside_a_running_server_leaves_it_alone(server):
    root = server.command[server.command.index("--cgroup-root") + 1]
    cli = Cli(server)
    task_id = cli.start_id("client001", "sleep", "30")
    try:
        driver = server.command[server.command.index("--cgroup-driver") + 1]
        result = _check("--state-dir", str(server.state_dir), "--cgroup-root", root,
                        "--cgroup-driver", driver)
        out = result.stdout.decode()
        assert result.returncode == 0, out
        if "hybrid" in out or "v2" in out:
            assert "in use by a running server" in out
        assert cli.status_row(task_id)["STATUS"] == "JOB_STATUS_STARTED"
    finally:
        cli.run("stop", task_id)


# -- the systemd unit

@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    # verify checks that ExecStart's binary exists: point it at the one under test.
    text = UNIT.read_text()
    assert "Delegate=yes" in text and "Restart=on-failure" in text
    binary = program("taskman-server")[-1] if shutil.which("taskman-server") else "/bin/true"
    unit = tmp_path / "taskman-server.service"
    unit.write_text(text.replace("/usr/local/bin/taskman-server", binary))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, timeout=60)
    # Without a running systemd (containers) verify still parses the unit;
    # only complaints about this file count.
    errors = [line for line in result.stderr.decode().splitlines() if unit.name in line]
    assert result.returncode == 0 and not errors, result.stderr.decode()


# -- the guard on health and reflection, in process (a real client cannot
# complete a TLS 1.2 handshake with the server to show it)

def _call(tls_version: bytes):
    return FakeCallContext((session_pki() / "client001.crt").read_bytes(), tls_version, b"client001")


class _Details:
    method = "/grpc.health.v1.Health/Check"


def test_health_and_reflection_pass_the_same_tls13_and_identity_guard(tmp_path):
    from taskman.audit import AuditLog
    from taskman.service import GuardInterceptor, TaskManagerServicer

    audit = AuditLog(str(tmp_path / "audit.log"))
    guard = GuardInterceptor(TaskManagerServicer(manager=None, audit=audit))
    inner = grpc.unary_unary_rpc_method_handler(lambda request, context: "SERVING")
    handler = guard.intercept_service(lambda details: inner, _Details())

    assert handler.unary_unary(None, _call(b"TLSv1.3")) == "SERVING"
    refused = _call(b"TLSv1.2")
    with pytest.raises(CallAborted):
        handler.unary_unary(None, refused)
    assert refused.aborted[0] is grpc.StatusCode.UNAUTHENTICATED
    audit.close()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    # The successful probe is not audited; the refused one is.
    assert [(r["method"], r["code"]) for r in records] == [
        ("grpc.health.v1.Health/Check", "UNAUTHENTICATED")]
