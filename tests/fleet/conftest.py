"""The fleet suite's fixtures: one real 3-node NATS cluster per session
(tests/fleet/nats_cluster.py) and fleet connections to it.

The only skip: ``nats_cluster.probe`` says the nats-server binary cannot
execute on this machine at all. The reason also goes to
$TASKMAN_PROOF_SKIP_FILE, so .ci/proof prints ``fleet: SKIPPED: <why>``.
A missing binary or a cluster that does not come up fails.
"""

import os
import uuid

import nats_cluster
import pytest

from taskman.fleet import bridge as bridge_module
from taskman.fleet.connection import Connection, Settings


def skip_whole_suite(reason: str) -> None:
    skip_file = os.environ.get("TASKMAN_PROOF_SKIP_FILE")
    if skip_file:
        with open(skip_file, "w") as file:
            file.write(reason + "\n")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nats_server_binary():
    binary = nats_cluster.server_binary()
    reason = nats_cluster.probe(binary)
    if reason:
        skip_whole_suite(reason)
    return binary


@pytest.fixture(scope="session")
def cluster(nats_server_binary, tmp_path_factory):
    cluster = nats_cluster.Cluster(tmp_path_factory.mktemp("nats"), nats_server_binary)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def closes_the_bridge_at_the_end():
    yield
    bridge_module.shared().close()


@pytest.fixture
def bridge(closes_the_bridge_at_the_end):
    """The process's one bridge (a test may kill or close it: the next
    test gets a new one)."""
    return bridge_module.shared()


@pytest.fixture
def connect(cluster, bridge):
    """connect(node=...) -> an open Connection as fleet server ``node``;
    closed after the test. Each test gets its own node names."""
    opened = []
    suffix = uuid.uuid4().hex[:6]

    def connect(node="a", servers=None, heartbeat_ttl=3.0, **settings):
        certificate, key = cluster.authority.issue(f"taskman-{node}-{suffix}")
        connection = Connection(bridge, Settings(
            servers=servers or cluster.urls, node=f"{node}-{suffix}",
            ca_file=cluster.authority.ca_file, certificate_file=certificate, key_file=key,
            heartbeat_ttl=heartbeat_ttl,
            **settings))
        opened.append(connection)
        return connection.open()

    yield connect
    for connection in opened:
        connection.close()
