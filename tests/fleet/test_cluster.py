"""The harness itself: three nodes in one JetStream cluster, mutual TLS, and
the layout a fleet server makes replicated on all three."""

import ssl

import pytest

from taskman.errors import ConfigError, Unavailable
from taskman.fleet.connection import OUTPUT_STREAM, TASKS_BUCKET, Connection, Settings


def test_the_layout_is_replicated_on_three_nodes(connect):
    connection = connect()
    info = connection.call(connection.jetstream.stream_info(OUTPUT_STREAM))
    assert info.config.num_replicas == 3
    assert info.cluster.leader
    assert len(info.cluster.replicas) == 2
    status = connection.call(connection.tasks.status())
    assert status.bucket == TASKS_BUCKET


def test_a_second_server_opening_the_same_layout_is_harmless(connect):
    connect("a")
    connection = connect("b")
    assert connection.call(connection.tasks.status()).bucket == TASKS_BUCKET


def test_a_client_without_a_certificate_is_refused(cluster, bridge):
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cluster.authority.ca_file)
    connection = Connection(bridge, Settings(servers=cluster.urls, node="anonymous"), tls=context)
    with pytest.raises((ConfigError, Unavailable)):
        connection.open(timeout=10)
    connection.close()


def test_a_server_of_another_ca_is_refused(cluster, bridge, tmp_path):
    from nats_cluster import Authority

    stranger = Authority(tmp_path / "other")
    certificate, key = stranger.issue("stranger")
    connection = Connection(bridge, Settings(
        servers=cluster.urls, node="stranger", ca_file=stranger.ca_file,
        certificate_file=certificate, key_file=key))
    with pytest.raises((ConfigError, Unavailable)):
        connection.open(timeout=10)
    connection.close()


def test_a_server_opening_while_the_cluster_forms_waits_for_jetstream(
        nats_server_binary, bridge, tmp_path):
    """One node up, no JetStream meta leader yet: opening waits (within its
    bound) for the other nodes, as a fleet server started beside a NATS
    cluster that is still forming must, rather than give up at once."""
    import threading
    import time

    from nats_cluster import Cluster

    forming = Cluster(tmp_path / "forming", nats_server_binary)
    first, *rest = forming.nodes
    first.start()
    certificate, key = forming.authority.issue("taskman-early")
    connection = Connection(bridge, Settings(
        servers=[first.url], node="early", ca_file=forming.authority.ca_file,
        certificate_file=certificate, key_file=key))

    def the_others_later():
        time.sleep(3)
        for node in rest:
            node.start()
    later = threading.Thread(target=the_others_later)
    later.start()
    try:
        connection.open(timeout=45)
        assert connection.call(connection.tasks.status()).bucket == TASKS_BUCKET
    finally:
        later.join()
        connection.close()
        forming.stop()
