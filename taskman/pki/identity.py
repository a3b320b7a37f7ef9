"""Who a peer is: exactly one valid common name, not revoked.

Parsing the peer's PEM matters: gRPC's ``x509_common_name`` shows only the
first of two CNs. Revocations come from the CA's signed CRL (``ca.crl``).
"""

import warnings
from typing import TYPE_CHECKING, Dict, Iterable, NamedTuple

from taskman.errors import ConfigError, Unauthenticated
from taskman.pki.names import PEER_CACHE_SIZE, name_problem

if TYPE_CHECKING:  # cryptography is imported where it is used: the CLI never needs it
    from cryptography import x509

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
    from cryptography import x509
    from cryptography.x509.oid import NameOID

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
        self.revoked = frozenset(revoked)  # from this host's CRL
        # Revoked on other hosts of a fleet (taskman.fleet.revocations): one
        # list for every replica; kept apart so a CRL reload does not drop it.
        self.fleet_revoked: frozenset = frozenset()
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
        if peer.serial in self.revoked or peer.serial in self.fleet_revoked:
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

    def reload_revocations(self, crl_path: str, ca_certificate: "x509.Certificate") -> bool:
        """Load the CRL again if its file changed; True if the set changed.

        A CRL that does not parse or is not signed by the CA is refused
        (ConfigError) and the previous set stays.
        """
        from taskman.pki.disk import file_stamp

        stamp = file_stamp(crl_path)
        if stamp == self._crl_stamp:
            return False
        revoked = read_revoked(crl_path, ca_certificate)
        self._crl_stamp = stamp
        changed = revoked != self.revoked
        self.revoked = revoked
        return changed


def read_revoked(crl_path: str, ca_certificate: "x509.Certificate") -> frozenset:
    """Serial numbers in the CRL at ``crl_path`` (none if the file is absent)."""
    from cryptography import x509

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
