"""The call guard in process: when a call's log line and audit record are written."""

import datetime
import json

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import CallAborted, FakeCallContext
from taskman.audit import AuditLog
from taskman.errors import NotFound
from taskman.guard import CallGuard


def _certificate(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


_PEM = []


def _call():
    """A call from client001 (its certificate made once)."""
    if not _PEM:
        _PEM.append(_certificate("client001"))
    return FakeCallContext(_PEM[0])


@pytest.fixture
def audited(tmp_path):
    audit = AuditLog(str(tmp_path / "audit.log"))
    yield CallGuard(audit=audit), lambda: [json.loads(line) for line in
                                           (tmp_path / "audit.log").read_text().splitlines()]
    audit.close()


def test_a_unary_call_is_reported_once_its_reply_is_sent_a_refusal_before(audited, caplog):
    guard, records = audited
    context = _call()
    caplog.set_level("INFO", logger="taskman.service")
    with guard.call(context, "GetTaskStatus", "t") as call:
        assert call.user == "client001"
    # The reply is not out yet: the caller does not wait for its own report.
    assert records() == [] and "method=GetTaskStatus" not in caplog.text
    context.end()
    [record] = records()
    assert (record["user"], record["method"], record["code"], record["peer"]) == \
        ("client001", "GetTaskStatus", "OK", "ipv4:127.0.0.1:1")
    assert caplog.text.count("user=client001 method=GetTaskStatus task=t code=OK") == 1

    refused = _call()
    with pytest.raises(CallAborted):
        with guard.call(refused, "GetTaskStatus", "t"):
            raise NotFound("task t not found")
    assert refused.aborted[0] is grpc.StatusCode.NOT_FOUND
    # Written before the abort, with no callback run.
    assert records()[-1]["code"] == "NOT_FOUND" and records()[-1]["detail"] == "task t not found"
