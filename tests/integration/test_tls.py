"""Mutual TLS 1.3 only: what the server must refuse, checked on the wire.

docs/design.md warns that under TLS 1.3 `openssl s_client` reports a session
even when the server then rejects the client: so each refusal here is checked
by what actually fails (a call, a read after the handshake), with a positive
control using the same tool.
"""

import os
import shutil
import socket
import ssl
import subprocess

import grpc
import pytest
from server_harness import REPO, session_pki, taskman

from taskman import tls
from taskman.api import task_manager_pb2, task_manager_pb2_grpc

pytestmark = pytest.mark.timeout(120)

UNKNOWN = "a7da14c7-b47a-4535-a263-5bb26e503002"
CERTS = str(session_pki())  # this run's PKI (conftest), as a server generates it
CA, CLIENT_CERT, CLIENT_KEY = tls.client_files("client001", CERTS)


def _context(maximum: ssl.TLSVersion, cert=CLIENT_CERT, key=CLIENT_KEY) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = maximum
    context.load_verify_locations(CA)
    context.set_alpn_protocols(["h2"])  # gRPC servers hang up on clients without it
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _handshake(server, context: ssl.SSLContext) -> str:
    """Handshake, then read: a TLS 1.3 server rejects a client certificate
    only after the client thinks the handshake is done. Returns the version."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as connection:
            version = connection.version()
            # An HTTP/2 client preface; a server that accepted us answers with
            # a SETTINGS frame, one that rejected the certificate with an alert.
            connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\4\0\0\0\0\0")
            if not connection.recv(9):
                raise ConnectionError("closed by the server")
            return version


def test_tls13_with_a_valid_certificate_works(server):
    assert _handshake(server, _context(ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"


def test_tls12_with_a_valid_certificate_is_refused(server):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(server, _context(ssl.TLSVersion.TLSv1_2))


def test_tls12_refused_at_the_hello(server):
    """The server does not even answer a TLS 1.2 ClientHello with a ServerHello."""
    assert "TLS 1.2" in tls.check_tls13_only("127.0.0.1", server.port)


def test_server_logged_its_own_tls12_self_test(server):
    """The logged outcome is the one a real TLS 1.2 handshake with this server
    gets now: a self-test skipped or faked with other words does not match."""
    refusal = tls.check_tls13_only("127.0.0.1", server.port)
    assert f"TLS 1.3 only; self-test: {refusal})" in server.log()


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed")
def test_openssl_s_client_tls12_fails_and_tls13_works(server):
    def s_client(*version):
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", *version,
             "-CAfile", CA, "-cert", CLIENT_CERT, "-key", CLIENT_KEY,
             "-servername", "localhost", "-alpn", "h2", "-verify_return_error"],
            input=b"", capture_output=True, timeout=30)

    refused = s_client("-tls1_2")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert b"New, (NONE), Cipher is (NONE)" in output  # no session was negotiated
    accepted = s_client("-tls1_3")
    output = accepted.stdout + accepted.stderr
    assert accepted.returncode == 0, output
    assert b"New, TLSv1.3, Cipher is TLS_" in output


def _status_call(server, credentials=None, insecure=False):
    address = server.address
    channel = (grpc.insecure_channel(address) if insecure
               else grpc.secure_channel(address, credentials, options=[
                   ("grpc.ssl_target_name_override", "localhost")]))
    with channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        return stub.GetTaskStatus(task_manager_pb2.TaskStatusRequest(task_id=UNKNOWN),
                                  timeout=15)


def _read(path):
    with open(path, "rb") as file:
        return file.read()


def test_grpc_with_a_valid_certificate_reaches_the_service(server):
    credentials = grpc.ssl_channel_credentials(_read(CA), _read(CLIENT_KEY), _read(CLIENT_CERT))
    with pytest.raises(grpc.RpcError) as failure:
        _status_call(server, credentials)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND  # it got in: the task is unknown


def test_a_client_without_a_certificate_is_refused(server):
    credentials = grpc.ssl_channel_credentials(_read(CA))
    with pytest.raises(grpc.RpcError) as failure:
        _status_call(server, credentials)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    # And on the wire: a TLS 1.3 handshake without a certificate gets no HTTP/2.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(server, _context(ssl.TLSVersion.TLSv1_3, cert=None))


def test_plaintext_is_refused(server):
    with pytest.raises(grpc.RpcError) as failure:
        _status_call(server, insecure=True)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory):
    """A whole other CA with its own client001 and admin, made by certs/generate.sh."""
    directory = tmp_path_factory.mktemp("foreign-pki")
    env = dict(os.environ, BITS="2048", DAYS="2", USERS="client001 admin")
    subprocess.run(["bash", str(REPO / "certs" / "generate.sh"), str(directory)], env=env,
                   check=True, capture_output=True, timeout=120)
    return directory


def _mixed_certs_dir(tmp_path, foreign_pki, user):
    """Trust the real CA (so the client accepts the server) but present a
    certificate from the other CA: only the server can refuse."""
    directory = tmp_path / "mixed"
    directory.mkdir()
    shutil.copy(CA, directory / "ca.crt")
    for suffix in (".crt", ".key"):
        shutil.copy(foreign_pki / (user + suffix), directory / (user + suffix))
    return directory


@pytest.mark.parametrize("user", ["client001", "admin"])
def test_a_certificate_from_another_ca_is_refused(server, tmp_path, foreign_pki, user):
    directory = _mixed_certs_dir(tmp_path, foreign_pki, user)
    result = taskman("get-status", UNKNOWN, "--user-id", user, "--server-address",
                     server.address, env={"TASKMAN_CERTS_DIR": str(directory)})
    assert result.returncode == 7, result.stderr
    assert b"cannot reach server" in result.stderr
    # On the wire, too: the handshake is refused with the foreign certificate.
    context = _context(ssl.TLSVersion.TLSv1_3, cert=str(directory / f"{user}.crt"),
                       key=str(directory / f"{user}.key"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(server, context)


def test_the_generated_pki_is_the_rfds(foreign_pki):
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in",
                           os.path.join(CERTS, "server.crt")],
                          capture_output=True, check=True, timeout=30).stdout.decode()
    assert "Public-Key: (4096 bit)" in text
    assert "sha256WithRSAEncryption" in text
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert "IP Address:0:0:0:0:0:0:0:1" in text
    for user in ("client001", "client002", "admin"):
        text = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext",
                               "extendedKeyUsage", "-in", os.path.join(CERTS, user + ".crt")],
                              capture_output=True, check=True, timeout=30).stdout.decode()
        assert f"CN = {user}" in text or f"CN={user}" in text
        assert "TLS Web Client Authentication" in text
        assert "Server Authentication" not in text


def test_identity_is_the_common_name_not_a_san(server, cli, tmp_path):
    """A certificate CN=client002 with SAN DNS:admin must act as client002."""
    key, csr, cert = (str(tmp_path / name) for name in ("k.pem", "r.csr", "c.pem"))
    extensions = tmp_path / "ext"
    extensions.write_text("extendedKeyUsage=clientAuth\nsubjectAltName=DNS:admin,DNS:client001\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-subj", "/CN=client002", "-out", csr], check=True, capture_output=True,
                   timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-sha256", "-days", "1", "-in", csr, "-CA", CA,
                    "-CAkey", os.path.join(CERTS, "ca.key"), "-set_serial", "7",
                    "-extfile", str(extensions), "-out", cert],
                   check=True, capture_output=True, timeout=60)
    owned_by_client001 = cli.start_id("client001", "true")
    cli.wait_ended(owned_by_client001)
    credentials = grpc.ssl_channel_credentials(_read(CA), _read(key), _read(cert))
    with pytest.raises(grpc.RpcError) as failure:
        channel = grpc.secure_channel(server.address, credentials)
        with channel:
            stub = task_manager_pb2_grpc.TaskManagerStub(channel)
            stub.GetTaskStatus(task_manager_pb2.TaskStatusRequest(task_id=owned_by_client001),
                               timeout=15)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert "user=client002 method=GetTaskStatus" in server.log()
