"""The per-host PKI and strict identities, with real certificates.

One RSA-4096 PKI is made per module (about five seconds) and each test gets a
copy; tests that make more keys use 2048 bits, which costs a few ms.
"""

import datetime
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taskman import pki
from taskman.errors import ConfigError, InvalidArgument, Unauthenticated

EXTRA_NAMES = ("taskman.example.org", "10.1.2.3")
SMALL_KEY = 2048


@pytest.fixture(scope="module")
def made_once(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pki-once") / "pki")
    return pki.PKI.open(directory, extra_names=EXTRA_NAMES)


@pytest.fixture
def local(made_once, tmp_path):
    copy = made_once.copy_to(str(tmp_path / "pki"))
    copy.key_size = SMALL_KEY
    return copy


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def certificate(path):
    return pki.load_certificate(path)


def read(path):
    with open(path, "rb") as file:
        return file.read()


def lifetime_days(cert):
    return (cert.not_valid_after_utc - cert.not_valid_before_utc - pki.BACKDATE).total_seconds() / 86400


# -- creation

def test_first_start_makes_a_ca_a_server_and_three_clients_private_to_root(made_once):
    directory = made_once.directory
    assert mode(directory) == 0o700 and mode(os.path.join(directory, pki.ISSUED)) == 0o700
    keys = [name for name in os.listdir(directory) if name.endswith(".key")]
    assert sorted(keys) == ["admin.key", "ca.key", "client001.key", "client002.key", "server.key"]
    assert all(mode(os.path.join(directory, name)) == 0o600 for name in keys)
    assert made_once.local_clients() == ["admin", "client001", "client002"]
    assert not [name for name in os.listdir(os.path.dirname(directory)) if name.startswith(".")], \
        "the temporary build directory was left behind"
    authority = certificate(os.path.join(directory, pki.CA_CERT))
    assert authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("ca", "server", "client001", "client002", "admin"):
        cert = certificate(os.path.join(directory, name + ".crt"))
        assert cert.public_key().key_size == 4096
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        if name != "ca":
            pki.check_pair(cert.public_bytes(pki.serialization.Encoding.PEM),
                           read(os.path.join(directory, name + ".key")), read(os.path.join(directory, "ca.crt")))


def test_the_server_certificate_names_loopback_this_host_and_the_extra_names(made_once):
    cert = certificate(made_once.path(pki.SERVER_CERT))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", socket.gethostname(), EXTRA_NAMES[0]}
    assert {str(address) for address in names.get_values_for_type(x509.IPAddress)} == \
        {"127.0.0.1", "::1", EXTRA_NAMES[1]}
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert round(lifetime_days(cert)) == pki.SERVER_DAYS


def test_client_certificates_are_short_lived_and_for_clients_only(made_once):
    cert = certificate(made_once.path("client002.crt"))
    assert [attribute.value for attribute in cert.subject] == ["client002"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert round(lifetime_days(cert)) == pki.CLIENT_DAYS
    assert round(lifetime_days(certificate(made_once.path(pki.CA_CERT)))) == pki.CA_DAYS


def test_a_second_start_reuses_the_pki(local):
    serials = {status.name: status.serial for status in local.status()}
    again = pki.PKI.open(local.directory, extra_names=EXTRA_NAMES, key_size=SMALL_KEY)
    assert {status.name: status.serial for status in again.status()} == serials
    assert again.renew() == []


def test_a_non_empty_directory_that_is_not_a_pki_is_refused(tmp_path):
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a PKI directory"):
        pki.PKI.open(str(tmp_path / "pki"), key_size=SMALL_KEY)


# -- one CA for several servers

def test_two_servers_sharing_a_ca_directory_accept_each_others_clients(tmp_path):
    shared = str(tmp_path / "ca")
    first = pki.PKI.open(str(tmp_path / "one"), ca_directory=shared, clients=("client001",),
                         key_size=SMALL_KEY)
    second = pki.PKI.open(str(tmp_path / "two"), ca_directory=shared, clients=(), key_size=SMALL_KEY)
    assert not os.path.exists(first.path(pki.CA_KEY)), "the CA key stays in the CA directory"
    assert read(first.path(pki.CA_CERT)) == read(second.path(pki.CA_CERT)) == read(os.path.join(shared, "ca.crt"))
    pki.check_pair(read(first.path("client001.crt")), read(first.path("client001.key")),
                   read(second.path(pki.CA_CERT)), "client")
    # A revocation made through one server is seen by the other.
    first.revoke("client001")
    assert second.revoked() == {certificate(first.path("client001.crt")).serial_number}
    with pytest.raises(ConfigError, match="CA kept elsewhere"):
        pki.PKI.open(str(tmp_path / "two"), key_size=SMALL_KEY)


def test_an_operator_ca_given_as_certificate_and_key_is_copied_in(made_once, tmp_path):
    ca_files = (made_once.path(pki.CA_CERT), made_once.path(pki.CA_KEY))
    imported = pki.PKI.open(str(tmp_path / "imported"), ca_files=ca_files, clients=(), key_size=SMALL_KEY)
    assert mode(imported.path(pki.CA_KEY)) == 0o600
    pki.check_pair(read(imported.path(pki.SERVER_CERT)), read(imported.path(pki.SERVER_KEY)),
                   read(made_once.path(pki.CA_CERT)))
    with pytest.raises(ConfigError, match="does not match"):
        pki.PKI.open(str(tmp_path / "mismatch"), ca_files=(ca_files[0], made_once.path("admin.key")),
                     key_size=SMALL_KEY)
    with pytest.raises(ConfigError, match="not a CA"):
        pki.PKI.open(str(tmp_path / "not-ca"), key_size=SMALL_KEY,
                     ca_files=(made_once.path("admin.crt"), made_once.path("admin.key")))
    assert not os.path.exists(tmp_path / "mismatch") and not os.path.exists(tmp_path / "not-ca")


# -- issuing, listing, revoking

def test_issue_writes_a_bundle_for_another_machine(local, tmp_path):
    bundle = local.issue("bob", days=2, out=str(tmp_path / "out"))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["bob.crt", "bob.key", "ca.crt"]
    assert mode(out) == 0o700 and mode(out / "bob.key") == 0o600
    assert read(out / "ca.crt") == read(local.path(pki.CA_CERT))
    cert = certificate(out / "bob.crt")
    assert cert.serial_number == bundle.serial and round(lifetime_days(cert)) == 2
    assert pki.identity_from_pem(read(out / "bob.crt")) == "bob"
    listed = {entry.serial: entry for entry in local.issued()}
    assert listed[bundle.serial].name == "bob" and not listed[bundle.serial].revoked


@pytest.mark.parametrize("name", ["ADMIN", "admin ", "\u0430dmin", "", "-x", "a" * 65, "server", "ca"])
def test_names_that_would_be_refused_as_identities_are_not_issued(local, name):
    with pytest.raises(InvalidArgument):
        local.issue(name)


def test_revoking_by_name_and_by_serial_updates_a_signed_crl(local):
    bob = local.issue("bob")
    carol = local.issue("carol")
    revoked = local.revoke("bob")
    assert [(entry.name, entry.serial, entry.revoked) for entry in revoked] == [("bob", bob.serial, True)]
    local.revoke(f"{carol.serial:x}")
    crl = x509.load_pem_x509_crl(read(local.crl_path))
    assert crl.is_signature_valid(certificate(local.path(pki.CA_CERT)).public_key())
    assert {entry.serial_number for entry in crl} == {bob.serial, carol.serial} == local.revoked()
    assert {entry.name for entry in local.issued() if entry.revoked} == {"bob", "carol"}
    with pytest.raises(InvalidArgument, match="no unrevoked certificate"):
        local.revoke("bob")
    with pytest.raises(InvalidArgument):
        local.revoke("nobody")


def test_a_crl_not_signed_by_the_ca_is_refused(local, tmp_path):
    other = pki.Authority.create(str(tmp_path / "other"), "other CA", key_size=SMALL_KEY)
    with open(local.crl_path, "wb") as file:
        file.write(read(other.path(pki.CA_CRL)))
    with pytest.raises(ConfigError, match="not signed by the CA"):
        local.revoked()


def test_peer_check_refuses_a_revoked_certificate_once_the_crl_is_reloaded(local):
    bob = local.issue("bob")
    check = pki.PeerCheck()
    ca = certificate(local.path(pki.CA_CERT))
    assert check.reload_revocations(local.crl_path, ca) is False  # an empty list: nothing changed
    assert check.identify(bob.cert_pem) == "bob"
    local.revoke("bob")
    assert check.reload_revocations(local.crl_path, ca) is True
    with pytest.raises(Unauthenticated, match="revoked"):
        check.identify(bob.cert_pem)
    assert check.is_revoked(bob.cert_pem)
    assert check.identify(read(local.path("admin.crt"))) == "admin"
    assert check.reload_revocations(local.crl_path, ca) is False, "an unchanged file is not read again"


def test_a_cached_identity_costs_microseconds(made_once):
    pem = read(made_once.path("client001.crt"))
    check = pki.PeerCheck(revoked=range(1000))
    check.identify(pem)
    calls = 20000
    start = time.perf_counter()
    for _ in range(calls):
        check.identify(pem)
    per_call = (time.perf_counter() - start) / calls
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} us per cached identity"


# -- renewal

def later(local, days):
    now = datetime.datetime.now(datetime.timezone.utc)
    local.authority.clock = lambda: now + datetime.timedelta(days=days)


def test_nothing_is_renewed_early(local):
    assert [status.renew for status in local.status()] == [None] * 5
    later(local, 4)
    assert local.renew() == []


def test_clients_are_renewed_past_two_thirds_of_their_lifetime_and_the_server_later(local):
    old = {status.name: status.serial for status in local.status()}
    later(local, 5)
    due = {status.name for status in local.status() if status.renew}
    assert due == {"admin", "client001", "client002"}
    assert sorted(local.renew()) == ["admin", "client001", "client002"]
    renewed = {status.name: status for status in local.status()}
    assert renewed["client001"].serial != old["client001"] and renewed["server"].serial == old["server"]
    assert round(renewed["client001"].days_left) == pki.CLIENT_DAYS
    pki.check_pair(read(local.path("client001.crt")), read(local.path("client001.key")),
                   read(local.path(pki.CA_CERT)), "client")
    assert mode(local.path("client001.key")) == 0o600
    later(local, 21)  # the clients renewed on day 5 have expired by now too
    assert sorted(local.renew()) == ["admin", "client001", "client002", "server"]
    pki.check_pair(read(local.path(pki.SERVER_CERT)), read(local.path(pki.SERVER_KEY)),
                   read(local.path(pki.CA_CERT)))
    later(local, 31)
    assert {status.name: status.renew for status in local.status()}["server"] is None


def test_an_expired_certificate_and_changed_names_are_renewed(local):
    later(local, 40)
    assert {status.name: status.renew for status in local.status()}["server"] == "expired"
    assert "days left" in pki.status_table(local.status())
    local.authority.clock = lambda: datetime.datetime.now(datetime.timezone.utc)
    local.server_names = pki.default_server_names(["new.example.org"])
    assert local.renew() == ["server"]
    names = certificate(local.path(pki.SERVER_CERT)).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "new.example.org" in names.get_values_for_type(x509.DNSName)


# -- identity of hostile certificates

@pytest.fixture(scope="module")
def minting_key():
    return pki.new_key(SMALL_KEY)


def mint(key, attributes, san=None):
    """A self-signed certificate with exactly the subject given, as PEM."""
    subject = x509.Name(attributes)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(pki.serialization.Encoding.PEM)


def common_name(value):
    # _validate=False lets a test mint what cryptography would not, as an
    # attacker's tools would (a 65-character CN).
    return x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)


def rdn(*attributes):
    return x509.RelativeDistinguishedName(attributes)


@pytest.mark.parametrize("names", [("admin", "client002"), ("client002", "admin")])
def test_two_common_names_are_refused_in_either_order(minting_key, names):
    pem = mint(minting_key, [common_name(name) for name in names])
    with pytest.raises(Unauthenticated, match="2 common names .*exactly one is required"):
        pki.identity_from_pem(pem)


def test_two_common_names_in_one_multi_valued_rdn_are_refused(minting_key):
    subject = x509.Name([rdn(common_name("admin"), common_name("client002"))])
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
           .public_key(minting_key.public_key()).serial_number(1).not_valid_before(now)
           .not_valid_after(now + datetime.timedelta(days=1)).sign(minting_key, hashes.SHA256())
           .public_bytes(pki.serialization.Encoding.PEM))
    with pytest.raises(Unauthenticated, match="2 common names"):
        pki.identity_from_pem(pem)


def test_no_common_name_is_refused(minting_key):
    pem = mint(minting_key, [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "admin")], san="admin")
    with pytest.raises(Unauthenticated, match="no common name"):
        pki.identity_from_pem(pem)


@pytest.mark.filterwarnings("ignore:Attribute's length")
@pytest.mark.parametrize("name, reason", [
    ("ADMIN", "upper-case"),
    ("Admin", "upper-case"),
    ("admin ", "spaces or control characters"),
    (" admin", "spaces or control characters"),
    ("admin\nFAKE user=admin", "spaces or control characters"),
    ("\u0430dmin", "non-ASCII"),  # Cyrillic a
    ("admin\u200b", "non-ASCII"),  # zero-width space
    ("-admin", "not a valid name"),
    (".", "not a valid name"),
    ("a" * 64 + "b", "longer than 64"),
])
def test_look_alike_and_malformed_names_are_refused_with_the_reason(minting_key, name, reason):
    with pytest.raises(Unauthenticated, match=reason) as refused:
        pki.identity_from_pem(mint(minting_key, [common_name(name)]))
    message = str(refused.value)
    assert message.isascii() and message.isprintable(), "the reason quotes the name escaped"


def test_a_subject_alternative_name_does_not_change_who_the_client_is(minting_key):
    assert pki.identity_from_pem(mint(minting_key, [common_name("client002")], san="admin")) == "client002"


@pytest.mark.parametrize("name", ["admin", "client001", "a", "0", "svc.backup_2-x", "a" * 64])
def test_valid_names_are_accepted(minting_key, name):
    assert pki.identity_from_pem(mint(minting_key, [common_name(name)])) == name


def test_garbage_is_refused_and_refusals_are_cached(minting_key):
    check = pki.PeerCheck()
    for pem in (b"not a certificate", mint(minting_key, [common_name("ADMIN")])):
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                check.identify(pem)
    assert len(check._peers) == 2


# -- rotation under a live gRPC server

def test_a_rotated_server_certificate_reaches_new_connections_while_a_stream_continues(local):
    script = os.path.join(os.path.dirname(__file__), "rotation_check.py")
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="0")
    done = subprocess.run([sys.executable, script, local.directory], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["check_without_change"] is False and seen["check_after_renewal"] is True
    assert seen["before"] != seen["after"] == seen["file_serial"]
    assert seen["stream_exact"], "the stream opened before the rotation was cut or corrupted"
    assert seen["new_call"] == ["0\n", "1\n", "2\n"] and seen["old_channel_call"] == ["0\n", "1\n"]


# -- the committed demo CA (its key is public)

DEMO_CA = os.path.join(os.path.dirname(__file__), "..", "..", "certs", "ca.crt")


def test_the_committed_demo_ca_is_recognised_and_a_generated_one_is_not(made_once):
    with open(DEMO_CA, "rb") as file:
        demo = file.read()
    assert pki.trusts_demo_ca(demo)
    assert pki.trusts_demo_ca(made_once.authority.cert_pem + demo)  # in a bundle too
    assert not pki.trusts_demo_ca(made_once.authority.cert_pem)
    assert not pki.trusts_demo_ca(b"not a certificate")
