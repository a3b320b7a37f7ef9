"""PEM files of the PKI: atomic writes with their modes from the first byte,
parsing with readable errors, and proving that a key fits its certificate.
"""

import hashlib
from typing import Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from taskman.errors import ConfigError
from taskman.pki.disk import read_file
from taskman.pki.names import KEY_SIZE


def load_certificate(path: str, what: str = "certificate") -> x509.Certificate:
    """Parse a PEM certificate file; ConfigError naming the file if impossible."""
    try:
        return x509.load_pem_x509_certificate(read_file(path, what))
    except ValueError:
        raise ConfigError(f"the {what} {path} is not a PEM certificate") from None


def load_key(path: str, what: str = "key"):
    """Parse an unencrypted PEM private key file; ConfigError if impossible."""
    try:
        return _load_key_pem(read_file(path, what))
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


# The public key (SHA-256 of its SubjectPublicKeyInfo) of the demo CA
# committed in certs/ca.crt, whose private key is public (certs/ca.key):
# anyone can mint any identity it trusts.
DEMO_CA_KEY_SHA256 = "17500749091b488347659c7de16ee5798c4672bcc29e5eb8afdd42afea36f091"


def public_key_sha256(certificate: x509.Certificate) -> str:
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def trusts_demo_ca(ca_pem: bytes) -> bool:
    """True if the CA bundle ``ca_pem`` holds the committed demo CA (its key is public)."""
    try:
        certificates = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return False
    return any(public_key_sha256(certificate) == DEMO_CA_KEY_SHA256 for certificate in certificates)
