"""One revocation list for the fleet (taskman.fleet.revocations), against
the real 3-node NATS cluster: a certificate revoked in one server's PKI is
refused by another server's peer check after one sync on each side."""

import pytest

from taskman import credentials, pki
from taskman.errors import Unauthenticated
from taskman.fleet.revocations import FleetRevocations

pytestmark = pytest.mark.timeout(120)


class LocalOnly:
    """A replica's peers with an empty local CRL (its own PKI revoked nothing)."""

    def __init__(self):
        self.check = pki.PeerCheck()


@pytest.fixture(scope="module")
def authority(tmp_path_factory):
    """One CA and a PKI using it (small keys, for speed), as a fleet shares it."""
    directory = tmp_path_factory.mktemp("revocations")
    return pki.PKI.open(str(directory / "pki"), ca_directory=str(directory / "ca"),
                        key_size=2048)


def pem(authority, user):
    with open(authority.path(f"{user}.crt"), "rb") as file:
        return file.read()


def test_a_revocation_on_one_host_is_refused_on_another(connect, authority):
    host_a = credentials.Peers(authority.path(pki.CA_CERT), authority.crl_path)
    host_b = LocalOnly()
    on_a = FleetRevocations(connect("a"), host_a).open()
    on_b = FleetRevocations(connect("b"), host_b).open()
    assert host_b.check.identify(pem(authority, "client002")) == "client002"

    authority.revoke("client002")
    assert host_a.refresh()  # A's own CRL (the watch loop does this every 2 s)
    on_a.sync()
    assert on_b.sync()
    with pytest.raises(Unauthenticated, match="revoked"):
        host_b.check.identify(pem(authority, "client002"))
    assert host_b.check.identify(pem(authority, "client001")) == "client001"
    assert not on_b.sync()  # nothing new

    # A CRL reload on B (its own list) keeps what the fleet revoked.
    host_b.check.revoked = frozenset()
    with pytest.raises(Unauthenticated):
        host_b.check.identify(pem(authority, "client002"))


def test_publishing_is_idempotent_and_a_restarted_server_learns_the_list(connect, authority):
    serial = next(issued.serial for issued in authority.revoke("admin"))
    host_a = credentials.Peers(authority.path(pki.CA_CERT), authority.crl_path)
    first = FleetRevocations(connect("a"), host_a).open()
    first.sync()
    assert first.publish(host_a.check.revoked) == 0  # already there
    again = FleetRevocations(connect("a2"), host_a).open()  # the same host, restarted
    again.sync()
    fresh = LocalOnly()
    FleetRevocations(connect("c"), fresh).open().sync()
    assert serial in fresh.check.fleet_revoked


def test_a_fleet_out_of_reach_keeps_the_list_merged_before(connect, authority):
    revoked = next(issued.serial for issued in authority.revoke("client001"))
    host_a = credentials.Peers(authority.path(pki.CA_CERT), authority.crl_path)
    FleetRevocations(connect("a"), host_a).open().sync()
    host_b = LocalOnly()
    connection = connect("b")
    on_b = FleetRevocations(connection, host_b).open()
    on_b.sync()
    assert revoked in host_b.check.fleet_revoked
    connection.close()
    assert not on_b.sync()
    assert on_b.last_error is not None
    assert revoked in host_b.check.fleet_revoked
