"""A certificate authority directory: ca.crt, ca.key, ca.crl and issued/.

Issuing and revoking hold a lock on the directory, so a CLI issuing
certificates and a server renewing its own do not lose each other's CRL
entries. Several servers may share one authority directory.
"""

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import socket
from typing import Callable, Iterable, List, NamedTuple, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taskman.errors import ConfigError, InvalidArgument
from taskman.pki.disk import _make_directory, write_atomically
from taskman.pki.files import (
    _key_pem,
    _pem,
    _same_key,
    _signs_for,
    load_certificate,
    load_key,
    new_key,
)
from taskman.pki.identity import read_revoked
from taskman.pki.names import (
    BACKDATE,
    CA_CERT,
    CA_CRL,
    CA_DAYS,
    CA_KEY,
    CLIENT_DAYS,
    ISSUED,
    KEY_SIZE,
    LOCK,
    _now,
    check_name,
)

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
