"""A server's PKI directory: created on first use, renewed, listed.

See the package docstring for the layout.
"""

import datetime
import json
import os
import shutil
import socket
import tempfile
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from taskman.errors import ConfigError
from taskman.pki.authority import Authority, Bundle, Issued, _general_name, default_server_names
from taskman.pki.disk import _fsync_directory, _make_directory, write_atomically
from taskman.pki.files import _pem, load_certificate
from taskman.pki.names import (
    CA_CERT,
    CA_CRL,
    CLIENT_DAYS,
    DEFAULT_CLIENTS,
    KEY_SIZE,
    RENEW_AFTER,
    RESERVED_NAMES,
    SERVER_CERT,
    SERVER_DAYS,
    _now,
    check_name,
)

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
