"""The per-host PKI against the real server and CLI: hostile certificates,
revocation and rotation without a restart, first start, a shared CA, the demo
CA's refusal off loopback, and log lines that client strings cannot forge.

Hostile certificates are minted with ``cryptography`` (and one with openssl)
and signed by the run's CA (conftest), which every server here trusts.
"""

import datetime
import json
import os
import re
import shutil
import ssl
import stat
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from server_harness import REPO, Server, program, program_env, session_pki, taskman, wait_for

from taskman import pki
from taskman.api import task_manager_pb2, task_manager_pb2_grpc

pytestmark = pytest.mark.timeout(180)

UNKNOWN = "a7da14c7-b47a-4535-a263-5bb26e503002"
CERTS = session_pki()
DEMO = REPO / "certs"


def _read(path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # hostile keys: speed


def _mint(subject: x509.Name, days: float = 1, signer=None, ca_dir=CERTS) -> tuple:
    """(certificate PEM, key PEM) for ``subject``, clientAuth, signed by the CA in ``ca_dir``."""
    ca_cert = x509.load_pem_x509_certificate(_read(ca_dir / "ca.crt"))
    ca_key = signer or serialization.load_pem_private_key(_read(ca_dir / "ca.key"), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    begin, end = (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)) if days < 0 \
        else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(begin).not_valid_after(end)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                   .sign(ca_key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            _key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))


def _cn(*names: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in names])


def _call(server, cert_pem: bytes, key_pem: bytes, task_id: str = UNKNOWN, ca=CERTS / "ca.crt"):
    """GetTaskStatus with a raw channel; the RpcError (or None on success)."""
    credentials = grpc.ssl_channel_credentials(_read(ca), key_pem, cert_pem)
    with grpc.secure_channel(server.address, credentials, options=[
            ("grpc.ssl_target_name_override", "localhost")]) as channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        try:
            stub.GetTaskStatus(task_manager_pb2.TaskStatusRequest(task_id=task_id), timeout=15)
        except grpc.RpcError as error:
            return error
    return None


@pytest.fixture(scope="module")
def pki_server(tmp_path_factory):
    instance = Server(tmp_path_factory.mktemp("pki-server")).start()
    yield instance
    assert instance.stop() == 0, instance.log()


# -- strict names

@pytest.mark.parametrize("subject, reason", [
    (_cn("admin", "client002"), "2 common names"),
    (_cn("client002", "admin"), "2 common names"),
    (x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "admin")]), "no common name"),
    (_cn("ADMIN"), "upper-case"),
    (_cn("admin "), "spaces or control characters"),
    (_cn("\u0430dmin"), "non-ASCII"),  # a Cyrillic a
])
def test_hostile_names_are_unauthenticated_with_a_reason(pki_server, subject, reason):
    error = _call(pki_server, *_mint(subject))
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert reason in error.details()


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed")
def test_two_common_names_minted_by_openssl_are_refused(pki_server, tmp_path):
    key, csr, cert = (str(tmp_path / name) for name in ("k.pem", "r.csr", "c.pem"))
    extensions = tmp_path / "ext"
    extensions.write_text("extendedKeyUsage=clientAuth\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-subj", "/CN=admin/CN=client002", "-out", csr], check=True,
                   capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-sha256", "-days", "1", "-in", csr,
                    "-CA", str(CERTS / "ca.crt"), "-CAkey", str(CERTS / "ca.key"),
                    "-set_serial", "9", "-extfile", str(extensions), "-out", cert],
                   check=True, capture_output=True, timeout=60)
    error = _call(pki_server, _read(cert), _read(key))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "exactly one is required" in error.details()


def test_an_expired_certificate_is_refused(pki_server):
    error = _call(pki_server, *_mint(_cn("client001"), days=-1))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake


def test_a_demo_ca_certificate_is_refused_by_a_generated_pki(pki_server):
    error = _call(pki_server, _read(DEMO / "admin.crt"), _read(DEMO / "admin.key"))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE


# -- log lines

def test_client_strings_cannot_forge_log_lines(pki_server):
    forged = "x\n2026-01-01 00:00:00,000 INFO taskman.service: FAKE user=admin method=StopTask"
    error = _call(pki_server, *_mint(_cn("client001")), task_id=forged)
    assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    error = _call(pki_server, *_mint(_cn("admin\nFAKE user=admin")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    wait_for(lambda: pki_server.log().count("method=GetTaskStatus") >= 2)
    log = pki_server.log()
    assert not re.search(r"^(x|FAKE|2026-01-01)", log, re.MULTILINE), log
    assert "task=x\\n2026-01-01" in log  # escaped, on the call's own line


# -- revocation and rotation, no restart

def test_a_revoked_certificate_is_refused_next_call_and_its_stream_ends(pki_server, tmp_path):
    bundle = tmp_path / "carol"
    issued = subprocess.run([*program("taskman-server"), "pki", "issue", "carol", "--days", "1",
                             "--out", str(bundle), "--state-dir", str(pki_server.state_dir)],
                            capture_output=True, timeout=60, env=program_env())
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE(os.stat(bundle / "carol.key").st_mode) == 0o600
    env = {"TASKMAN_CERTS_DIR": str(bundle)}
    address = ("--server-address", pki_server.address, "--user-id", "carol")
    started = taskman("start", *address, "--", "sh", "-c", "while :; do echo tick; sleep 0.2; done",
                      env=env)
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.decode().split()[-1]
    stream = subprocess.Popen([*program("taskman"), "stream", task_id, *address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=program_env(env))
    assert stream.stdout.readline() == b"tick\n"
    revoked = subprocess.run([*program("taskman-server"), "pki", "revoke", "carol",
                              "--state-dir", str(pki_server.state_dir)],
                             capture_output=True, timeout=60, env=program_env())
    assert revoked.returncode == 0 and b"revoked carol" in revoked.stdout, revoked.stderr
    refused = taskman("get-status", task_id, *address, env=env)
    assert refused.returncode != 0 and b"revoked" in refused.stderr, refused.stderr
    try:
        _, err = stream.communicate(timeout=15)  # ends within a re-check period
    finally:
        stream.kill()
    # Its follower asks again and is told why, instead of a bare CANCELLED.
    assert stream.returncode != 0 and b"revoked" in err, err
    assert "ending a stream of carol: certificate revoked" in pki_server.log()
    records = [json.loads(line) for line in
               (pki_server.state_dir / "audit.log").read_text().splitlines()]
    assert [record for record in records if record.get("code") == "UNAUTHENTICATED"
            and "carol" in (record.get("detail") or "") and "revoked" in record["detail"]]
    stopped = taskman("stop", task_id, "--server-address", pki_server.address,
                      "--user-id", "admin")
    assert stopped.returncode == 0, stopped.stderr


def _server_serial(server) -> int:
    context = ssl.create_default_context(cafile=str(CERTS / "ca.crt"))
    context.load_cert_chain(str(CERTS / "client001.crt"), str(CERTS / "client001.key"))
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(__import__("socket").create_connection(("127.0.0.1", server.port)),
                             server_hostname="localhost") as connection:
        der = connection.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_rotating_the_server_certificate_keeps_an_open_stream_byte_exact(pki_server):
    script = "i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); sleep 0.01; done"
    expected = b"".join(b"line-%d\n" % i for i in range(300))
    before = _server_serial(pki_server)
    started = taskman("start", "--server-address", pki_server.address, "--user-id", "client001",
                      "--", "sh", "-c", script)
    task_id = started.stdout.decode().split()[-1]
    stream = subprocess.Popen([*program("taskman"), "stream", task_id, "--server-address",
                               pki_server.address, "--user-id", "client001"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=program_env())
    assert stream.stdout.readline() == b"line-0\n"
    directory = str(pki_server.pki_dir)
    home = pki.PKI(directory, pki.Authority(directory), pki.default_server_names())
    renewed = home._renew_server()
    wait_for(lambda: "server certificate reloaded" in pki_server.log(), timeout=15)
    output, errors = stream.communicate(timeout=60)
    assert stream.returncode == 0, errors
    assert b"line-0\n" + output == expected
    after = _server_serial(pki_server)
    assert after == renewed.serial != before


# -- first start, restart, a shared CA, the demo CA

def test_first_start_creates_the_pki_and_a_restart_reuses_it(tmp_path):
    server = Server(tmp_path, copy_pki=False).start()
    directory = server.pki_dir
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for name in ("ca.key", "server.key", "client001.key", "client002.key", "admin.key"):
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
    ca = _read(directory / "ca.crt")
    result = taskman("start", "--server-address", server.address, "--user-id", "client001", "--",
                     "true", env={"TASKMAN_CERTS_DIR": str(directory)})
    assert result.returncode == 0, result.stderr
    # --state-dir finds the same bundles, and wins over $TASKMAN_CERTS_DIR (this
    # process's points at the session PKI, whose CA this server does not trust).
    result = taskman("get-status", "--server-address", server.address, "--user-id", "client001",
                     "--state-dir", str(server.state_dir), result.stdout.split()[-1].decode())
    assert result.returncode == 0, result.stderr
    assert server.stop() == 0
    again = Server(tmp_path, copy_pki=False).start()
    try:
        assert _read(directory / "ca.crt") == ca
        assert "using the PKI in" in again.log()
    finally:
        assert again.stop() == 0


def test_two_servers_sharing_a_ca_accept_the_same_client_certificate(tmp_path, start_server):
    shared = tmp_path / "ca"
    first = start_server("--ca-dir", str(shared), copy_pki=False)
    second = start_server("--ca-dir", str(shared), copy_pki=False)
    assert not (first.pki_dir / "ca.key").exists()  # the key stays in the CA directory
    for server in (first, second):
        result = taskman("start", "--server-address", server.address, "--user-id", "client002",
                         "--", "true", env={"TASKMAN_CERTS_DIR": str(first.pki_dir)})
        assert result.returncode == 0, result.stderr


def test_the_demo_ca_is_refused_off_loopback_and_warned_about_on_it(tmp_path, start_server):
    env = program_env({"TASKMAN_CERTS_DIR": str(DEMO)})
    result = subprocess.run([*program("taskman-server"), "--server-address", "0.0.0.0:0",
                             "--state-dir", str(tmp_path / "state"), "--cgroup-driver", "none"],
                            capture_output=True, timeout=60, env=env)
    assert result.returncode == 1
    assert b"refusing to listen on 0.0.0.0" in result.stderr
    assert b"generate a private PKI" in result.stderr
    server = start_server(env={"TASKMAN_CERTS_DIR": str(DEMO)}, copy_pki=False)
    assert server.log().count("committed demo CA") == 1
