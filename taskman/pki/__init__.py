"""This host's certificates: a CA, the server's certificate, client bundles.

A PKI directory (0700, keys 0600) holds everything the server and a local CLI
need, in the layout ``TASKMAN_CERTS_DIR`` already expects::

    ca.crt  ca.key  ca.crl       the authority (ca.key only if it lives here)
    server.crt  server.key       for localhost, 127.0.0.1, ::1, the host's name
    <user>.crt  <user>.key       local client bundles (client001, client002, admin)
    issued/<serial>.crt          every certificate issued, for listing and revoking

The authority may instead live in a directory of its own that several
servers share (``ca_directory``), so that every replica accepts the same
client certificates; the PKI directory then holds a copy of ``ca.crt`` only.
Revocations are a real X.509 CRL signed by the CA (``ca.crl``).

Certificates are short-lived and renewed once past ``RENEW_AFTER`` of their
lifetime (``renew``); the server reloads the new files without a restart
(``taskman.credentials``). Names are checked twice with one pattern: when a
certificate is issued and when a peer presents one (``identity_from_pem``).

No grpc here: the library half of identity. RSA-4096 keys cost about a second
each; ``key_size`` exists so that tests can make one real PKI and copy it.
"""

import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taskman.errors import ConfigError, InvalidArgument, Unauthenticated

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_CRL = "ca.crl"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
ISSUED = "issued"
LOCK = ".lock"
RESERVED_NAMES = ("ca", "server")
DEFAULT_CLIENTS = ("client001", "client002", "admin")

KEY_SIZE = 4096
CA_DAYS = 3650
SERVER_DAYS = 30
CLIENT_DAYS = 7
# Renew once two thirds of a certificate's lifetime have passed: a 7-day
# certificate is replaced with more than two days to spare.
RENEW_AFTER = 2 / 3
# Accept a little clock skew between the host and its clients.
BACKDATE = datetime.timedelta(minutes=5)

# A user name: lower-case ASCII letters and digits, then also '.', '_' and
# '-', 1 to 64 characters. No upper case, spaces, control or non-ASCII
# characters, so that no name can pass for another one ("ADMIN", "admin ",
# a Cyrillic "аdmin") in logs and listings.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
NAME_RULE = ("lower-case ASCII letters, digits, '.', '_' and '-', starting with a letter "
             "or digit, at most 64 characters")
# Distinct peer certificates remembered by PeerCheck; beyond, it starts over.
PEER_CACHE_SIZE = 4096


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- names

def name_problem(name: str) -> Optional[str]:
    """Why ``name`` is not a valid user name, as a sentence; None if it is."""
    shown = ascii(name)
    if NAME_PATTERN.fullmatch(name):
        return None
    if not name:
        return "the common name is empty"
    if len(name) > 64:
        return f"the common name {shown[:40]}... is longer than 64 characters"
    if not name.isascii():
        return (f"the common name {shown} has non-ASCII characters, which can look like "
                "other names; names are " + NAME_RULE)
    if any(character.isspace() or not character.isprintable() for character in name):
        return f"the common name {shown} has spaces or control characters; names are " + NAME_RULE
    if name != name.lower():
        return f"the common name {shown} has upper-case letters; names are " + NAME_RULE
    return f"the common name {shown} is not a valid name; names are " + NAME_RULE


def check_name(name: str) -> str:
    """Return ``name`` if it can be issued a certificate; InvalidArgument if not."""
    problem = name_problem(name)
    if problem:
        raise InvalidArgument(problem)
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{name!r} is reserved for the PKI's own files")
    return name


# -- identity of a peer

class Peer(NamedTuple):
    name: str
    serial: int


def peer_from_pem(pem: bytes) -> Peer:
    """The user and serial number of a peer's leaf certificate (PEM).

    The certificate's subject must hold exactly one common name matching
    ``NAME_PATTERN``; subject alternative names are ignored. Parsing the PEM
    matters: gRPC's ``x509_common_name`` shows only the first of two CNs.
    Raises Unauthenticated with a sentence saying why.
    """
    try:
        # cryptography warns (rather than fails) on a CN over 64 characters;
        # the name check below refuses it with a reason instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certificate = x509.load_pem_x509_certificate(pem)
            names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        values = [attribute.value for attribute in names]
    except (ValueError, TypeError):
        raise Unauthenticated("the client certificate cannot be parsed") from None
    if not values:
        raise Unauthenticated("the client certificate has no common name (CN)")
    if len(values) > 1:
        shown = ", ".join(ascii(value) for value in values)
        raise Unauthenticated(f"the client certificate has {len(values)} common names ({shown}); "
                              "exactly one is required")
    name = values[0]
    if not isinstance(name, str):
        raise Unauthenticated("the client certificate's common name is not text")
    problem = name_problem(name)
    if problem:
        raise Unauthenticated(problem)
    return Peer(name, certificate.serial_number)


def identity_from_pem(pem: bytes) -> str:
    """The user named by a peer certificate; see ``peer_from_pem``."""
    return peer_from_pem(pem).name


class PeerCheck:
    """Identity plus revocation for each call, cached by the certificate's PEM.

    A connection presents the same PEM on every call, so parsing happens once
    per certificate; a cached call costs a dict and a set lookup. Refusals are
    cached too, so a hostile client cannot make every call parse.
    """

    def __init__(self, revoked: Iterable[int] = ()):
        self.revoked = frozenset(revoked)
        self._peers: Dict[bytes, object] = {}
        self._crl_stamp = None

    def identify(self, pem: bytes) -> str:
        """Return the user, or raise Unauthenticated (bad name, revoked)."""
        peer = self._peers.get(pem)
        if peer is None:
            try:
                peer = peer_from_pem(pem)
            except Unauthenticated as error:
                peer = error
            if len(self._peers) >= PEER_CACHE_SIZE:
                self._peers.clear()
            self._peers[pem] = peer
        if isinstance(peer, Unauthenticated):
            raise peer
        if peer.serial in self.revoked:
            raise Unauthenticated(f"the client certificate of {peer.name} "
                                  f"(serial {peer.serial:x}) is revoked")
        return peer.name

    def is_revoked(self, pem: bytes) -> bool:
        """True if the certificate is revoked: for open streams to re-check."""
        try:
            self.identify(pem)
        except Unauthenticated:
            return True
        return False

    def reload_revocations(self, crl_path: str, ca_certificate: x509.Certificate) -> bool:
        """Load the CRL again if its file changed; True if the set changed.

        A CRL that does not parse or is not signed by the CA is refused
        (ConfigError) and the previous set stays.
        """
        stamp = _stamp(crl_path)
        if stamp == self._crl_stamp:
            return False
        revoked = read_revoked(crl_path, ca_certificate)
        self._crl_stamp = stamp
        changed = revoked != self.revoked
        self.revoked = revoked
        return changed


# -- files

def _stamp(path: str):
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` whole or not at all, with ``mode`` from the first byte."""
    directory = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path))
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror}") from None


def load_certificate(path: str, what: str = "certificate") -> x509.Certificate:
    """Parse a PEM certificate file; ConfigError naming the file if impossible."""
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise ConfigError(f"the {what} {path} is not a PEM certificate") from None


def load_key(path: str, what: str = "key"):
    """Parse an unencrypted PEM private key file; ConfigError if impossible."""
    try:
        return _load_key_pem(_read(path, what))
    except (ValueError, TypeError):
        raise ConfigError(f"the {what} {path} is not an unencrypted PEM private key") from None


def _load_key_pem(data: bytes):
    # cryptography's own RSA check of a key costs about a second for 4096
    # bits, on the gevent hub; check_pair proves the key by signing instead.
    return serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)


def _same_key(certificate: x509.Certificate, key) -> bool:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    return (certificate.public_key().public_bytes(encoding, public)
            == key.public_key().public_bytes(encoding, public))


def check_pair(cert_pem: bytes, key_pem: bytes, ca_pem: Optional[bytes] = None,
               what: str = "server") -> None:
    """Raise ConfigError unless the key fits the certificate (and ``ca_pem`` signed it).

    gRPC keeps serving the old configuration when handed a mismatched pair,
    silently: checking first is the only way to hear about it.
    """
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = _load_key_pem(key_pem)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"the {what} certificate or key does not parse: {error}") from None
    if not _same_key(certificate, key) or not _signs_for(certificate, key):
        raise ConfigError(f"the {what} key does not match its certificate")
    if ca_pem is not None:
        try:
            authority = x509.load_pem_x509_certificate(ca_pem)
            certificate.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(f"the {what} certificate is not signed by the CA") from None


def _signs_for(certificate: x509.Certificate, key) -> bool:
    """True if a signature by ``key`` verifies with the certificate's public key."""
    if not isinstance(key, rsa.RSAPrivateKey):
        return True
    message = b"taskman key check"
    try:
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        certificate.public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_key(key_size: int = KEY_SIZE):
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _make_directory(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


# -- the authority

class Bundle(NamedTuple):
    """A freshly issued certificate and its key, in PEM."""
    name: str
    serial: int
    not_after: datetime.datetime
    cert_pem: bytes
    key_pem: bytes


class Issued(NamedTuple):
    name: str
    serial: int
    not_after: datetime.datetime
    revoked: bool


def read_revoked(crl_path: str, ca_certificate: x509.Certificate) -> frozenset:
    """Serial numbers in the CRL at ``crl_path`` (none if the file is absent)."""
    try:
        with open(crl_path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return frozenset()
    except OSError as error:
        raise ConfigError(f"cannot read the revocation list {crl_path}: {error.strerror}") from None
    try:
        crl = x509.load_pem_x509_crl(data)
        valid = crl.is_signature_valid(ca_certificate.public_key())
    except (ValueError, TypeError):
        raise ConfigError(f"the revocation list {crl_path} is not a PEM CRL") from None
    if not valid:
        raise ConfigError(f"the revocation list {crl_path} is not signed by the CA")
    return frozenset(entry.serial_number for entry in crl)


class Authority:
    """A CA directory: ca.crt, ca.key, ca.crl and issued/.

    Every change (issuing, revoking) holds an exclusive lock on the directory,
    so a CLI issuing certificates and a server renewing its own do not lose
    each other's CRL entries.
    """

    def __init__(self, directory: str, clock: Callable[[], datetime.datetime] = _now):
        self.directory = directory
        self.clock = clock
        self.certificate = load_certificate(self.path(CA_CERT), "CA certificate")
        self.cert_pem = _pem(self.certificate)
        self._key = None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def has_key(self) -> bool:
        return os.path.exists(self.path(CA_KEY))

    @property
    def key(self):
        if self._key is None:
            if not self.has_key:
                raise ConfigError(f"the CA key {self.path(CA_KEY)} is absent: "
                                  "certificates cannot be issued or renewed here")
            key = load_key(self.path(CA_KEY), "CA key")
            if not (_same_key(self.certificate, key) and _signs_for(self.certificate, key)):
                raise ConfigError(f"the CA key {self.path(CA_KEY)} does not match {self.path(CA_CERT)}")
            self._key = key
        return self._key

    @classmethod
    def create(cls, directory: str, common_name: str, days: int = CA_DAYS,
               key_size: int = KEY_SIZE, clock=_now) -> "Authority":
        """Generate a self-signed CA (RSA, sha256) in ``directory``."""
        _make_directory(directory)
        key = new_key(key_size)
        now = clock()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
        write_atomically(os.path.join(directory, CA_KEY), _key_pem(key), 0o600)
        write_atomically(os.path.join(directory, CA_CERT), _pem(certificate), 0o644)
        authority = cls(directory, clock)
        authority._key = key
        authority._write_crl([])
        return authority

    @classmethod
    def import_files(cls, directory: str, cert_path: str, key_path: str, clock=_now) -> "Authority":
        """Copy an operator's CA certificate and key into ``directory``.

        Raises ConfigError unless the certificate is a CA and the key is its own.
        """
        certificate = load_certificate(cert_path, "CA certificate")
        key = load_key(key_path, "CA key")
        if not (_same_key(certificate, key) and _signs_for(certificate, key)):
            raise ConfigError(f"the CA key {key_path} does not match the CA certificate {cert_path}")
        _check_is_ca(certificate, cert_path)
        _make_directory(directory)
        write_atomically(os.path.join(directory, CA_KEY), _key_pem(key), 0o600)
        write_atomically(os.path.join(directory, CA_CERT), _pem(certificate), 0o644)
        authority = cls(directory, clock)
        if not os.path.exists(authority.path(CA_CRL)):
            authority._write_crl([])
        return authority

    @contextlib.contextmanager
    def _locked(self):
        descriptor = os.open(self.path(LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _sign(self, subject: str, public_key, days: float, server_names: Sequence[str] = ()):
        now = self.clock()
        not_after = min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.certificate.public_key()), critical=False))
        if server_names:
            builder = (builder
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                      critical=False)
                       .add_extension(x509.SubjectAlternativeName(
                           [_general_name(name) for name in server_names]), critical=False))
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, name: str, days: float = CLIENT_DAYS, key_size: int = KEY_SIZE,
              server_names: Sequence[str] = ()) -> Bundle:
        """Sign a new key for ``name``: a client certificate, or a server one
        when ``server_names`` (DNS names and IP addresses) are given.

        The lifetime never outlasts the CA. Raises InvalidArgument for a name
        that would be refused as an identity, ConfigError without the CA key.
        """
        if not server_names:
            check_name(name)
        if days <= 0:
            raise InvalidArgument(f"a certificate lifetime must be positive (got {days} days)")
        key = new_key(key_size)
        with self._locked():
            certificate = self._sign(name, key.public_key(), days, server_names)
            _make_directory(self.path(ISSUED))
            write_atomically(os.path.join(self.path(ISSUED), f"{certificate.serial_number:x}.crt"),
                             _pem(certificate), 0o644)
        return Bundle(name, certificate.serial_number, certificate.not_valid_after_utc,
                      _pem(certificate), _key_pem(key))

    def issued(self) -> List[Issued]:
        """Every certificate this authority issued, oldest expiry first."""
        revoked = self.revoked()
        found = []
        try:
            names = os.listdir(self.path(ISSUED))
        except FileNotFoundError:
            names = []
        for file_name in names:
            if not file_name.endswith(".crt"):
                continue
            try:
                certificate = load_certificate(os.path.join(self.path(ISSUED), file_name))
            except ConfigError:
                continue
            common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(common_names[0].value) if common_names else ""
            found.append(Issued(name, certificate.serial_number, certificate.not_valid_after_utc,
                                certificate.serial_number in revoked))
        return sorted(found, key=lambda issued: (issued.not_after, issued.name))

    def revoked(self) -> frozenset:
        return read_revoked(self.path(CA_CRL), self.certificate)

    def revoke(self, name_or_serial: str) -> List[Issued]:
        """Revoke every unrevoked certificate issued to a name, or one serial
        (hexadecimal, as ``issued`` lists it). Return what was revoked.

        Raises InvalidArgument when nothing matches.
        """
        with self._locked():
            issued = self.issued()
            matches = [entry for entry in issued if entry.name == name_or_serial and not entry.revoked]
            if not matches:
                with contextlib.suppress(ValueError):
                    serial = int(name_or_serial.removeprefix("0x"), 16)
                    matches = [entry for entry in issued if entry.serial == serial and not entry.revoked]
            if not matches:
                raise InvalidArgument(f"no unrevoked certificate issued by this CA for "
                                      f"{ascii(name_or_serial)} (a name or a hexadecimal serial)")
            self._write_crl([entry.serial for entry in matches])
        return [entry._replace(revoked=True) for entry in matches]

    def _write_crl(self, new_serials: Iterable[int]) -> None:
        now = self.clock()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(now)
                   # Nothing here enforces next_update (PeerCheck reads the
                   # serials); it is set because the format requires one.
                   .next_update(now + datetime.timedelta(days=CA_DAYS)))
        known = set()
        with contextlib.suppress(FileNotFoundError):
            with open(self.path(CA_CRL), "rb") as file:
                for entry in x509.load_pem_x509_crl(file.read()):
                    known.add(entry.serial_number)
                    builder = builder.add_revoked_certificate(entry)
        for serial in new_serials:
            if serial not in known:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        crl = builder.sign(self.key, hashes.SHA256())
        write_atomically(self.path(CA_CRL), crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _check_is_ca(certificate: x509.Certificate, path: str) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"the certificate {path} is not a CA certificate (no basicConstraints CA:TRUE)")


_DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?", re.ASCII)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(name):
        raise ConfigError(f"{ascii(name)} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def default_server_names(extra: Iterable[str] = ()) -> List[str]:
    """localhost, 127.0.0.1, ::1, this host's name, then ``extra``, without repeats."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    for name in extra:
        if name not in names:
            names.append(name)
    return [name for name in names if name]


# -- the PKI directory

class Status(NamedTuple):
    """One certificate's state, for ``taskman-server --check``."""
    name: str            # "ca", "server" or a user
    path: str
    serial: int
    not_after: datetime.datetime
    days_left: float
    renew: Optional[str]  # why it should be renewed now, or None


class PKI:
    """A server's PKI directory; see the module docstring for its layout.

    ``open`` creates it on first use and loads it afterwards. Renewal and
    issuing write new files atomically; readers (the server's credentials,
    the CLI) pick them up when they next look.
    """

    def __init__(self, directory: str, authority: Authority, server_names: Sequence[str],
                 key_size: int = KEY_SIZE, server_days: float = SERVER_DAYS,
                 client_days: float = CLIENT_DAYS):
        self.directory = directory
        self.authority = authority
        self.server_names = list(server_names)
        self.key_size = key_size
        self.server_days = server_days
        self.client_days = client_days

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def clock(self):
        return self.authority.clock

    @classmethod
    def open(cls, directory: str, *, extra_names: Iterable[str] = (), ca_directory: Optional[str] = None,
             ca_files: Optional[Tuple[str, str]] = None, clients: Sequence[str] = DEFAULT_CLIENTS,
             key_size: int = KEY_SIZE, server_days: float = SERVER_DAYS,
             client_days: float = CLIENT_DAYS, clock=_now) -> "PKI":
        """Load the PKI in ``directory``, creating it first if it has none.

        The authority is generated here, or ``ca_files`` (certificate, key)
        are copied here, or the one in ``ca_directory`` is used in place (it
        is created if empty, so that the first server of a fleet can make
        it). A directory keeps its CA for life: naming another one raises
        ConfigError rather than orphaning the certificates already issued.
        A first start builds everything in a sibling directory and renames it
        into place, so an interrupted start leaves nothing half made.
        """
        if ca_directory and ca_files:
            raise ConfigError("give a CA directory or a CA certificate and key, not both")
        server_names = default_server_names(extra_names)
        for name in server_names:
            _general_name(name)
        for name in clients:
            check_name(name)
        settings = dict(key_size=key_size, server_days=server_days, client_days=client_days)
        if not os.path.exists(os.path.join(directory, CA_CERT)):
            cls._create(directory, server_names, ca_directory, ca_files, clients, settings, clock)
        if ca_directory:
            if not os.path.exists(os.path.join(ca_directory, CA_CERT)):
                raise ConfigError(f"the CA directory {ca_directory} has no {CA_CERT}")
            authority = Authority(ca_directory, clock)
        else:
            authority = Authority(directory, clock)
            if ca_files:
                imported = load_certificate(ca_files[0], "CA certificate")
                if _pem(imported) != authority.cert_pem:
                    raise ConfigError(f"the PKI in {directory} was made with another CA than "
                                      f"{ca_files[0]}; move it away to start a new one")
            elif not authority.has_key:
                raise ConfigError(f"the PKI in {directory} uses a CA kept elsewhere: "
                                  "give its CA directory")
        if _pem(load_certificate(os.path.join(directory, CA_CERT), "CA certificate")) != authority.cert_pem:
            raise ConfigError(f"the PKI in {directory} was made with another CA than the one in "
                              f"{authority.directory}; move it away to start a new one")
        return cls(directory, authority, server_names, **settings)

    @classmethod
    def _create(cls, directory, server_names, ca_directory, ca_files, clients, settings, clock):
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        if os.path.isdir(directory) and os.listdir(directory):
            raise ConfigError(f"{directory} is not empty but holds no {CA_CERT}: "
                              "not a PKI directory; move it away or name another")
        building = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(directory) + ".")
        try:
            os.chmod(building, 0o700)
            if ca_directory:
                if os.path.exists(os.path.join(ca_directory, CA_CERT)):
                    authority = Authority(ca_directory, clock)
                else:
                    authority = Authority.create(ca_directory, f"taskman CA {socket.gethostname()}",
                                                 key_size=settings["key_size"], clock=clock)
                write_atomically(os.path.join(building, CA_CERT), authority.cert_pem, 0o644)
            elif ca_files:
                authority = Authority.import_files(building, ca_files[0], ca_files[1], clock)
            else:
                authority = Authority.create(building, f"taskman CA {socket.gethostname()}",
                                             key_size=settings["key_size"], clock=clock)
            pki = cls(building, authority, server_names, **settings)
            pki._renew_server()
            for name in clients:
                pki._renew_client(name)
            os.replace(building, directory)  # replaces an empty directory too
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        _fsync_directory(parent)

    def copy_to(self, directory: str) -> "PKI":
        """A copy of this PKI (files and modes) in ``directory``: lets tests
        make one PKI and hand each test its own."""
        shutil.copytree(self.directory, directory, copy_function=shutil.copy2)
        authority_directory = (directory if self.authority.directory == self.directory
                               else self.authority.directory)
        return PKI(directory, Authority(authority_directory, self.clock), self.server_names,
                   self.key_size, self.server_days, self.client_days)

    # -- bundles

    def local_clients(self) -> List[str]:
        """Users with a bundle in the PKI directory, sorted."""
        users = []
        for file_name in os.listdir(self.directory):
            user, extension = os.path.splitext(file_name)
            if (extension == ".crt" and user not in RESERVED_NAMES
                    and os.path.exists(self.path(user + ".key"))):
                users.append(user)
        return sorted(users)

    def _write_bundle(self, directory: str, file_name: str, bundle: Bundle) -> None:
        # The key first: a reader that sees the new certificate with the old
        # key rejects the pair (check_pair) and looks again later.
        write_atomically(os.path.join(directory, file_name + ".key"), bundle.key_pem, 0o600)
        write_atomically(os.path.join(directory, file_name + ".crt"), bundle.cert_pem, 0o644)

    def _renew_server(self) -> Bundle:
        bundle = self.authority.issue("taskman-server", self.server_days, self.key_size,
                                      server_names=self.server_names)
        self._write_bundle(self.directory, "server", bundle)
        return bundle

    def _renew_client(self, name: str, days: Optional[float] = None) -> Bundle:
        bundle = self.authority.issue(name, days or self.client_days, self.key_size)
        self._write_bundle(self.directory, name, bundle)
        return bundle

    def issue(self, name: str, days: Optional[float] = None, out: Optional[str] = None) -> Bundle:
        """Issue a client bundle for ``name``; with ``out``, write ca.crt,
        <name>.crt and <name>.key there (made 0700 if new)."""
        bundle = self.authority.issue(name, days or self.client_days, self.key_size)
        if out:
            if not os.path.isdir(out):
                _make_directory(out)
            write_atomically(os.path.join(out, CA_CERT), self.authority.cert_pem, 0o644)
            self._write_bundle(out, name, bundle)
        return bundle

    def revoke(self, name_or_serial: str) -> List[Issued]:
        return self.authority.revoke(name_or_serial)

    def issued(self) -> List[Issued]:
        return self.authority.issued()

    def revoked(self) -> frozenset:
        return self.authority.revoked()

    @property
    def crl_path(self) -> str:
        return self.authority.path(CA_CRL)

    # -- renewal

    def status(self) -> List[Status]:
        """Days left and whether to renew, for the CA, the server and each local bundle."""
        now = self.clock()
        statuses = [self._status("ca", self.path(CA_CERT), now),
                    self._status("server", self.path(SERVER_CERT), now)]
        statuses += [self._status(name, self.path(name + ".crt"), now) for name in self.local_clients()]
        return statuses

    def _status(self, name: str, path: str, now: datetime.datetime) -> Status:
        certificate = load_certificate(path)
        begin, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        days_left = (end - now).total_seconds() / 86400
        reason = None
        if name != "ca":
            if now >= end:
                reason = "expired"
            elif now >= begin + (end - begin) * RENEW_AFTER:
                reason = f"{days_left:.1f} days left, past {RENEW_AFTER:.0%} of its lifetime"
            elif certificate.issuer != self.authority.certificate.subject or not _signed_by(
                    certificate, self.authority.certificate):
                reason = "not signed by the current CA"
            elif name == "server" and _server_names(certificate) != set(self.server_names):
                reason = "its names differ from those configured"
        elif now >= begin + (end - begin) * RENEW_AFTER:
            reason = f"the CA has {days_left:.0f} days left: plan a new CA"
        return Status(name, path, certificate.serial_number, end, days_left, reason)

    def renew(self) -> List[str]:
        """Renew the server certificate and the local bundles that need it;
        return the names renewed. The CA itself is never renewed here."""
        renewed = []
        for status in self.status():
            if status.renew is None or status.name == "ca":
                continue
            if status.name == "server":
                self._renew_server()
            else:
                self._renew_client(status.name)
            renewed.append(status.name)
        return renewed


def _signed_by(certificate: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _server_names(certificate: x509.Certificate) -> set:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(name.value) for name in names}


def status_table(statuses: Iterable[Status]) -> str:
    """Lines for ``--check``: name, days left, expiry, and what to do."""
    lines = []
    for status in statuses:
        line = (f"{status.name:<12} {status.days_left:7.1f} days left  "
                f"(until {status.not_after:%Y-%m-%d %H:%M} UTC)")
        if status.renew:
            line += f"  renew: {status.renew}"
        lines.append(line)
    return "\n".join(lines)


def issued_json(issued: Iterable[Issued]) -> str:
    """``pki list`` as JSON lines (names escaped by json)."""
    return "\n".join(json.dumps({"name": entry.name, "serial": f"{entry.serial:x}",
                                 "not_after": entry.not_after.isoformat(),
                                 "revoked": entry.revoked}) for entry in issued)
