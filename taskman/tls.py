"""Mutual TLS: certificate files, the TLS 1.3 guard, identity from a call.

grpcio has no setting for a minimum TLS version and accepts TLS 1.2 by
default. What works (docs/design.md): ``GRPC_SSL_CIPHER_SUITES``
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

from taskman import pki
from taskman.defaults import CERTS_DIR_VARIABLE, default_state_dir
from taskman.errors import ConfigError, Unauthenticated  # tls.Unauthenticated is the library's

# A TLS 1.2 PSK suite: never offered by certificate-based clients, so no
# TLS 1.2 handshake can agree on a cipher. TLS 1.3 suites are not affected.
TLS12_CIPHER_BLOCKER = "PSK-AES128-CBC-SHA"
TLS13 = b"TLSv1.3"

CA_CERT = "ca.crt"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
PKI_DIR = "pki"  # in the server's state directory
_NOT_USERS = ("ca", "server")


# Identity without revocations, for callers that keep no PeerCheck of their own.
_DEFAULT_PEERS = pki.PeerCheck()


class TLSConfigError(ConfigError):
    """A certificate or key is missing, unreadable or does not fit."""


class Identity(NamedTuple):
    user: str
    tls_version: str
    pem: bytes  # the peer's certificate, for re-checking open streams against revocations


def restrict_to_tls13(environ=os.environ) -> None:
    """Make this process's gRPC speak TLS 1.3 only; call before importing grpc.

    Raises RuntimeError if grpc is already imported (the setting would be
    ignored silently).
    """
    if "grpc" in sys.modules and environ.get("GRPC_SSL_CIPHER_SUITES") != TLS12_CIPHER_BLOCKER:
        raise RuntimeError("restrict_to_tls13() must run before grpc is imported")
    environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHER_BLOCKER


# -- certificate files

def pki_dir(state_dir: Optional[str] = None) -> str:
    """The PKI a server keeps in ``state_dir`` (default: the default state directory)."""
    return os.path.join(state_dir or default_state_dir(), PKI_DIR)


def certs_dir(override: Optional[str] = None, state_dir: Optional[str] = None) -> str:
    """``override``, else $TASKMAN_CERTS_DIR, else the PKI in the state directory.

    The last is where a server started without certificate options keeps its
    generated PKI: readable by root only, so on the server's host root's CLI
    finds the bundles by --user-id alone.
    """
    return override or os.environ.get(CERTS_DIR_VARIABLE) or pki_dir(state_dir)


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


def client_files(user: str, directory: Optional[str] = None,
                 state_dir: Optional[str] = None) -> Tuple[str, str, str]:
    """Return (ca, certificate, key) paths for ``user`` (see ``certs_dir``).

    Raises TLSConfigError naming the users that exist when ``user`` has none,
    or saying why the directory cannot be read.
    """
    directory = certs_dir(directory, state_dir)
    cert = os.path.join(directory, user + ".crt")
    key = os.path.join(directory, user + ".key")
    if not os.path.isdir(directory) or not os.access(directory, os.R_OK | os.X_OK):
        state = "cannot be read by this user" if os.path.isdir(directory) else "does not exist"
        raise TLSConfigError(
            f"no certificates for {user!r}: {directory} {state}. On the server's host run the "
            f"CLI as a user who can read the server's PKI (root), with --state-dir if the server "
            f"has one; elsewhere set {CERTS_DIR_VARIABLE} to a directory holding ca.crt, "
            f"{user}.crt and {user}.key (made by `taskman-server pki issue {user} --out DIR`)")
    if not user or user in _NOT_USERS or not (os.path.exists(cert) and os.path.exists(key)):
        users = known_users(directory)
        choices = ", ".join(users) if users else "none"
        raise TLSConfigError(f"unknown user {user!r}: certificates exist for {choices} "
                             f"(in {directory})")
    return os.path.join(directory, CA_CERT), cert, key


def server_files(ca: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None, state_dir: Optional[str] = None) -> Tuple[str, str, str]:
    """Return (ca, certificate, key) paths, defaulting to the certs directory."""
    directory = certs_dir(None, state_dir)
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

def caller(context, peers=None) -> Identity:
    """Return who made the call, from the verified client certificate.

    The user is the single common name of the certificate's subject, parsed
    from the PEM (``x509_pem_cert``) by ``peers`` (a pki.PeerCheck, which
    also refuses revoked certificates). Never ``x509_common_name``: gRPC
    shows only the first of two CNs there, so /CN=admin/CN=client002 would
    pass as admin; never ``peer_identities()``: those are the subject
    alternative names when there are any. Raises Unauthenticated with a
    sentence unless the call came over TLS 1.3 with exactly one valid name.
    """
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        raise Unauthenticated("the connection is not TLS")
    versions = auth.get("ssl_tls_version", [])
    if versions != [TLS13]:
        shown = b",".join(versions).decode("ascii", "replace") or "unknown"
        raise Unauthenticated(f"TLS 1.3 is required (the connection uses {shown})")
    certificates = auth.get("x509_pem_cert", [])
    if len(certificates) != 1 or not certificates[0]:
        raise Unauthenticated("the connection presented no client certificate")
    pem = certificates[0]
    user = (peers or _DEFAULT_PEERS).identify(pem)
    return Identity(user, TLS13.decode(), pem)


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
