"""The servicer's tables and guards, in-process: errors to status codes, the
status response's optional fields, identity from the auth context."""

import datetime

import grpc
import pytest
from server_harness import session_pki

from taskman import errors, tls
from taskman.cli.client import EXIT_CODES
from taskman.service import message_for, status_for, status_response
from taskman.task import JobStatus, Source, Task

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("error, code", [
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.CommandNotFound("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotExecutable("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.CgroupError("x"), grpc.StatusCode.INTERNAL),
    (errors.TaskmanError("x"), grpc.StatusCode.INTERNAL),
])
def test_error_table(error, code):
    assert status_for(error) == code


def test_every_library_error_has_a_status_and_an_exit_code():
    for kind in (errors.TaskmanError, *errors.TaskmanError.__subclasses__()):
        code = status_for(kind("x"))
        assert code.name in EXIT_CODES or code == grpc.StatusCode.INTERNAL


def test_cgroup_errors_say_so():
    assert message_for(errors.CgroupError("cannot write cpu.max")) == \
        "server cgroup error: cannot write cpu.max"


def _task(**fields):
    base = dict(id="a7da14c7-b47a-4535-a263-5bb26e503002", owner="client001", command="true",
                args=[], pid=42,
                start_time=datetime.datetime(2024, 11, 10, 22, 58, tzinfo=datetime.timezone.utc))
    base.update(fields)
    return Task(**base)


def test_running_task_has_no_exit_code_or_end_time():
    response = status_response(_task())
    assert not response.HasField("exit_code") and not response.HasField("end_time")
    assert response.status == JobStatus.STARTED and response.process_id == 42
    assert response.start_time.ToDatetime() == datetime.datetime(2024, 11, 10, 22, 58)


def test_ended_task_has_every_field():
    end = datetime.datetime(2024, 11, 10, 23, 0, tzinfo=datetime.timezone.utc)
    response = status_response(_task(status=JobStatus.SIGNALED, exit_code=137, signal="SIGKILL",
                                     source=Source.OOM, end_time=end))
    assert response.HasField("exit_code") and response.exit_code == 137
    assert (response.termination_signal, response.termination_source) == ("SIGKILL", "oom")
    assert response.end_time.ToDatetime() == datetime.datetime(2024, 11, 10, 23, 0)


def test_exit_code_zero_is_set_not_absent():
    end = datetime.datetime(2024, 11, 10, 23, 0, tzinfo=datetime.timezone.utc)
    response = status_response(_task(status=JobStatus.EXITED_OK, exit_code=0, end_time=end))
    assert response.HasField("exit_code") and response.exit_code == 0


class _Context:
    def __init__(self, auth):
        self._auth = auth

    def auth_context(self):
        return self._auth


GOOD = {"transport_security_type": [b"ssl"], "ssl_tls_version": [b"TLSv1.3"],
        "x509_common_name": [b"client002"], "x509_subject_alternative_name": [b"admin"],
        "x509_pem_cert": [(session_pki() / "client002.crt").read_bytes()]}


def test_identity_is_the_common_name():
    assert tls.caller(_Context(GOOD)).user == "client002"


@pytest.mark.parametrize("change", [
    {"ssl_tls_version": [b"TLSv1.2"]},
    {"ssl_tls_version": []},
    {"transport_security_type": [b"insecure"]},
    {"x509_pem_cert": []},
    {"x509_pem_cert": [b""]},
    {"x509_pem_cert": [b"not a pem"]},
])
def test_calls_not_over_tls13_with_one_common_name_are_refused(change):
    with pytest.raises(tls.Unauthenticated):
        tls.caller(_Context({**GOOD, **change}))


def test_restrict_to_tls13_refuses_after_grpc_import():
    environ = {}
    with pytest.raises(RuntimeError):  # grpc is imported in this process
        tls.restrict_to_tls13(environ)
    environ = {"GRPC_SSL_CIPHER_SUITES": tls.TLS12_CIPHER_BLOCKER}
    tls.restrict_to_tls13(environ)  # already in effect: fine
