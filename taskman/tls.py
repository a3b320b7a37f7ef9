"""Mutual TLS: certificate files, the TLS 1.3 guard, identity from a call.

grpcio has no setting for a minimum TLS version and accepts TLS 1.2 by
default. What works (NOTES.md, re-measured here): ``GRPC_SSL_CIPHER_SUITES``
set to a TLS 1.2 suite no client offers, in the environment *before* grpc is
first imported. Every TLS <= 1.2 handshake then fails for want of a shared
cipher, while TLS 1.3, whose suites that list does not govern, still works.
Set after the import it is silently ignored, and it is undocumented, so it is
guarded twice: ``check_tls13_only`` proves at start-up that a TLS 1.2
handshake is refused, and ``caller`` rejects any call not made over TLS 1.3.

This module imports grpc only inside the functions that need it, so that
``restrict_to_tls13`` can run before grpc is imported.
"""

import os
import socket
import ssl
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

from taskman.defaults import CERTS_DIR_VARIABLE
from taskman.errors import ConfigError, Unauthenticated  # tls.Unauthenticated is the library's

# A TLS 1.2 PSK suite: never offered by certificate-based clients, so no
# TLS 1.2 handshake can agree on a cipher. TLS 1.3 suites are not affected.
TLS12_CIPHER_BLOCKER = "PSK-AES128-CBC-SHA"
TLS13 = b"TLSv1.3"

CA_CERT = "ca.crt"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
_NOT_USERS = ("ca", "server")


class TLSConfigError(ConfigError):
    """A certificate or key is missing, unreadable or does not fit."""


class Identity(NamedTuple):
    user: str
    tls_version: str


def restrict_to_tls13(environ=os.environ) -> None:
    """Make this process's gRPC speak TLS 1.3 only; call before importing grpc.

    Raises RuntimeError if grpc is already imported (the setting would be
    ignored silently).
    """
    if "grpc" in sys.modules and environ.get("GRPC_SSL_CIPHER_SUITES") != TLS12_CIPHER_BLOCKER:
        raise RuntimeError("restrict_to_tls13() must run before grpc is imported")
    environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHER_BLOCKER


# -- certificate files

def packaged_certs_dir() -> str:
    """The certificates shipped inside the package (taskman/certs)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs")


def certs_dir(override: Optional[str] = None) -> str:
    """``override``, else $TASKMAN_CERTS_DIR, else the packaged certificates."""
    return override or os.environ.get(CERTS_DIR_VARIABLE) or packaged_certs_dir()


def known_users(directory: str) -> List[str]:
    """Users with a certificate and key in ``directory``, sorted."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    users = []
    for name in names:
        user, extension = os.path.splitext(name)
        if (extension == ".crt" and user not in _NOT_USERS
                and os.path.exists(os.path.join(directory, user + ".key"))):
            users.append(user)
    return sorted(users)


def client_files(user: str, directory: Optional[str] = None) -> Tuple[str, str, str]:
    """Return (ca, certificate, key) paths for ``user``.

    Raises TLSConfigError naming the users that exist when ``user`` has none.
    """
    directory = certs_dir(directory)
    cert = os.path.join(directory, user + ".crt")
    key = os.path.join(directory, user + ".key")
    if not user or user in _NOT_USERS or not (os.path.exists(cert) and os.path.exists(key)):
        users = known_users(directory)
        choices = ", ".join(users) if users else "none"
        raise TLSConfigError(f"unknown user {user!r}: certificates exist for {choices} "
                             f"(in {directory})")
    return os.path.join(directory, CA_CERT), cert, key


def server_files(ca: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None) -> Tuple[str, str, str]:
    """Return (ca, certificate, key) paths, defaulting to the certs directory."""
    directory = certs_dir()
    return (ca or os.path.join(directory, CA_CERT),
            cert or os.path.join(directory, SERVER_CERT),
            key or os.path.join(directory, SERVER_KEY))


def read_pem(path: str, what: str) -> bytes:
    """Read a PEM file; TLSConfigError with a readable reason if impossible."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise TLSConfigError(f"cannot read the {what} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"the {what} {path} is not a PEM file")
    return data


def load_pair(ca: str, cert: str, key: str, what: str) -> Dict[str, bytes]:
    """Read and check a CA bundle plus a certificate and its key.

    Python's ssl validates them, so that a bad file is reported by name at
    start-up rather than as an opaque handshake failure later.
    """
    files = {"ca": read_pem(ca, "CA certificate"), "cert": read_pem(cert, f"{what} certificate"),
             "key": read_pem(key, f"{what} key")}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=files["ca"].decode("ascii", "replace"))
    except ssl.SSLError as error:
        raise TLSConfigError(f"invalid CA certificate {ca}: {error.reason or error}") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as error:
        raise TLSConfigError(f"invalid {what} certificate or key ({cert}, {key}): "
                             f"{error.reason or error}") from None
    return files


# -- gRPC credentials

def server_credentials(ca: str, cert: str, key: str):
    """mTLS server credentials: a client certificate signed by ``ca`` is required."""
    import grpc

    files = load_pair(ca, cert, key, "server")
    return grpc.ssl_server_credentials([(files["key"], files["cert"])],
                                       root_certificates=files["ca"],
                                       require_client_auth=True)


def channel_credentials(ca: str, cert: str, key: str):
    """mTLS channel credentials presenting ``cert`` and trusting ``ca``."""
    import grpc

    files = load_pair(ca, cert, key, "client")
    return grpc.ssl_channel_credentials(root_certificates=files["ca"],
                                        private_key=files["key"],
                                        certificate_chain=files["cert"])


# -- identity

def caller(context) -> Identity:
    """Return who made the call, from the verified client certificate.

    The user is the certificate's Common Name (``x509_common_name``), never
    ``peer_identities()``: that returns the subject alternative names when
    there are any, so a certificate CN=client002, SAN=admin would pass as
    admin. Raises Unauthenticated unless the call came over TLS 1.3.
    """
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        raise Unauthenticated("the connection is not TLS")
    versions = auth.get("ssl_tls_version", [])
    if versions != [TLS13]:
        shown = b",".join(versions).decode("ascii", "replace") or "unknown"
        raise Unauthenticated(f"TLS 1.3 is required (the connection uses {shown})")
    names = auth.get("x509_common_name", [])
    if len(names) != 1 or not names[0]:
        raise Unauthenticated("the client certificate has no single common name")
    try:
        user = names[0].decode("utf-8")
    except UnicodeDecodeError:
        raise Unauthenticated("the client certificate's common name is not UTF-8") from None
    return Identity(user, TLS13.decode())


# -- the start-up self-test

class TLS12Accepted(ConfigError):
    """The server negotiated TLS 1.2: the TLS 1.3-only restriction is not in effect."""


def check_tls13_only(host: str, port: int, timeout: float = 5.0) -> str:
    """Prove that ``host:port`` refuses a TLS 1.2 handshake; return how it refused.

    Sends the ClientHello of a TLS 1.2 client and looks at the first record
    the server answers with: a handshake record is a ServerHello, i.e. the
    server agreed to TLS 1.2 (raise TLS12Accepted); an alert or a closed
    connection is a refusal. Looking at the record, not at whether the
    handshake as a whole fails, keeps the test honest: a handshake that got
    past ServerHello but failed later on the client certificate would prove
    nothing. Raises OSError if the server cannot be reached.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(hello)
        try:
            answer = connection.recv(65536)
        except ConnectionResetError:
            return "connection reset after the TLS 1.2 ClientHello"
    if not answer:
        return "connection closed after the TLS 1.2 ClientHello"
    record_type = answer[0]
    if record_type == 0x16:  # handshake: ServerHello
        raise TLS12Accepted("the server answered a TLS 1.2 ClientHello with a ServerHello")
    if record_type == 0x15:  # alert
        incoming.write(answer)
        try:
            tls.do_handshake()
        except ssl.SSLError as error:
            return f"TLS 1.2 handshake refused with an alert ({error.reason or error})"
        return "TLS 1.2 handshake refused with an alert"
    raise TLS12Accepted(f"unexpected TLS record type {record_type} in answer to a "
                        "TLS 1.2 ClientHello")
