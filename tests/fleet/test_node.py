"""FleetNode, what the composition root will build: parsing its options,
joining, serving through the Backend interface, leaving."""

import uuid

import gevent
import pytest

from taskman.errors import CommandNotFound, ConfigError, NotFound
from taskman.fleet import liveness, output
from taskman.fleet.backend import FleetBackend, wait_ended
from taskman.fleet.connection import Settings
from taskman.fleet.node import FleetNode, check_node_name, parse_servers
from taskman.fleet.records import RUNNING, Record, Records
from taskman.fleet.worker import Worker
from taskman.manager import TaskManager
from taskman.task import JobStatus


def test_server_urls_are_checked():
    assert parse_servers("nats://a:4222, tls://10.0.0.2:4222") == [
        "nats://a:4222", "tls://10.0.0.2:4222"]
    for bad in ("", "a:4222", "http://a:4222", "nats://a", "nats://:4222", "nats://a:port"):
        with pytest.raises(ConfigError):
            parse_servers(bad)


def test_node_names_are_subject_tokens():
    assert check_node_name("host-1_b") == "host-1_b"
    for bad in ("", "a.b", "a b", "a*", "a>"):
        with pytest.raises(ConfigError):
            check_node_name(bad)


def test_node_labels_are_key_value_pairs():
    from taskman.fleet.options import FleetOptions, parse_labels

    assert parse_labels(["zone=eu-1", "gpu=", " a = b "]) == {"zone": "eu-1", "gpu": "", "a": "b"}
    for bad in (["zone"], ["=x"]):
        with pytest.raises(ConfigError):
            parse_labels(bad)
    options = FleetOptions.from_command_line({"--fleet": "nats://a:4222", "--node": "n",
                                              "--fleet-capacity": "2",
                                              "--fleet-heartbeat-ttl": "15",
                                              "--node-label": ["zone=a"]})
    assert options.labels == {"zone": "a"}
    with pytest.raises(ConfigError, match="--node-label needs --fleet"):
        FleetOptions.from_command_line({"--node-label": ["zone=a"]})


def test_a_node_joins_serves_and_leaves(cluster, tmp_path):
    certificate, key = cluster.authority.issue("node-test")
    settings = Settings(servers=cluster.urls, node="node-test", ca_file=cluster.authority.ca_file,
                        certificate_file=certificate, key_file=key, heartbeat_ttl=3.0)
    manager = TaskManager(state_dir=str(tmp_path / "state"), stop_grace=1.0)
    node = FleetNode(settings, manager, capacity=2).open()
    try:
        assert "node-test" in liveness.live_hosts(node.connection)
        task = node.backend.start("alice", "sh", ["-c", "echo hello; exit 3"])
        assert b"".join(node.backend.stream("alice", task.id)) == b"hello\n"
        final = wait_ended(node.backend, "alice", task.id, 20)
        assert (final.status, final.exit_code) == (JobStatus.EXITED_ERROR, 3)
    finally:
        manager.shutdown(timeout=5)
        node.close()
    assert node.connection.client.is_closed


def test_a_node_needs_room_for_one_task(cluster, tmp_path):
    with pytest.raises(ConfigError):
        FleetNode(Settings(servers=cluster.urls, node="n"), manager=None, capacity=0)


def test_retention_removes_the_record_and_output_from_the_fleet(cluster, tmp_path):
    """What the host's manager forgets (retention), the fleet forgets too."""
    certificate, key = cluster.authority.issue("node-retention")
    settings = Settings(servers=cluster.urls, node="node-retention",
                        ca_file=cluster.authority.ca_file, certificate_file=certificate,
                        key_file=key, heartbeat_ttl=3.0)
    manager = TaskManager(state_dir=str(tmp_path / "state"), stop_grace=1.0, retention_age=1.0)
    node = FleetNode(settings, manager, capacity=2).open()
    try:
        task = node.backend.start("alice", "sh", ["-c", "echo bye"])
        assert b"".join(node.backend.stream("alice", task.id)) == b"bye\n"
        wait_ended(node.backend, "alice", task.id, 20)
        with gevent.Timeout(20):
            while task.id in node.worker.owners:
                node.worker.sweep(age=1.0)
                gevent.sleep(0.25)
        with pytest.raises(NotFound):
            node.backend.status("alice", task.id)
        assert list(output.follow(node.connection, task.id, live=False)) == []
    finally:
        manager.shutdown(timeout=5)
        node.close()


def test_a_restarted_host_takes_its_tasks_back(cluster, connect, tmp_path):
    """A server restarted (or reloaded) under the same node name: a task its
    manager knows gets its output and end into the fleet; one it does not
    is recorded lost."""
    manager = TaskManager(state_dir=str(tmp_path / "state"), stop_grace=1.0)
    connection = connect("again")
    records = Records(connection)
    try:
        local = manager.start("alice", "sh", ["-c", "echo from the earlier life"])
        while manager.status("alice", local.id).running:
            gevent.sleep(0.05)
        known = Record(id=local.id, owner="alice", command="sh", args=[],
                       phase=RUNNING, host=connection.settings.node)
        unknown = Record(id=str(uuid.uuid4()), owner="alice", command="sh", args=[],
                         phase=RUNNING, host=connection.settings.node)
        records.create(known)
        records.create(unknown)
        worker = Worker(connection, manager, capacity=1).start()
        try:
            backend = FleetBackend(connection)
            assert b"".join(backend.stream("alice", known.id)) == b"from the earlier life\n"
            assert wait_ended(backend, "alice", known.id, 20).status == JobStatus.EXITED_OK
            lost = backend.status("alice", unknown.id)
            assert (lost.status, lost.source.value) == (JobStatus.UNKNOWN, "lost")
        finally:
            worker.stop()
    finally:
        manager.shutdown(timeout=5)


def test_a_start_runs_on_the_replicas_own_host_while_it_has_room(cluster, connect, tmp_path):
    """A fleet server's replica claims a start for its own host (no offer
    between connections) while that host has room and is among the least
    loaded; full, it offers the next start to the fleet, and another host
    runs it. Refusals and errors are the host's as before."""
    certificate, key = cluster.authority.issue("node-own")
    settings = Settings(servers=cluster.urls, node=f"node-own-{uuid.uuid4().hex[:6]}",
                        ca_file=cluster.authority.ca_file, certificate_file=certificate,
                        key_file=key, heartbeat_ttl=3.0)
    manager = TaskManager(state_dir=str(tmp_path / "own"), stop_grace=1.0)
    other_manager = TaskManager(state_dir=str(tmp_path / "other"), stop_grace=1.0)
    other = Worker(connect("other"), other_manager, capacity=2).start()
    node = FleetNode(settings, manager, capacity=1).open()
    try:
        records = Records(node.connection)
        here = node.backend.start("alice", "sleep", ["30"])
        assert records.get(here.id)[0].host == settings.node
        assert manager.status("alice", here.id).running
        elsewhere = node.backend.start("alice", "sleep", ["30"])
        assert records.get(elsewhere.id)[0].host == other.node
        with pytest.raises(CommandNotFound):
            node.backend.stop("alice", here.id)
            gevent.sleep(0.5)
            node.backend.start("alice", "no-such-command-anywhere")
        node.backend.stop("alice", elsewhere.id)
    finally:
        manager.shutdown(timeout=5)
        other.stop()
        other_manager.shutdown(timeout=5)
        node.close()
