"""`taskman start/run --node-label key=value`: the labels a fleet host must
have (StartTaskRequest.node_labels). Only a fleet places by labels: a
standalone server refuses them (INVALID_ARGUMENT, exit 3), since no host of
its own could be told to have them; tests/fleet places them."""

import pytest
from server_harness import taskman

pytestmark = pytest.mark.timeout(120)


def test_a_standalone_server_refuses_node_labels(server):
    where = ("--user-id", "client001", "--server-address", server.address)
    started = taskman("start", *where, "--node-label", "disk=ssd", "--node-label", "zone=a=b",
                      "--", "true")
    assert started.returncode == 3, started.stderr.decode()
    assert b"node labels need a fleet server" in started.stderr
    ran = taskman("run", *where, "--node-label", "disk=ssd", "--", "sh", "-c", "exit 4")
    assert ran.returncode == 125 and b"node labels need a fleet" in ran.stderr, ran.stderr
    plain = taskman("run", *where, "--", "sh", "-c", "exit 4")
    assert plain.returncode == 4, plain.stderr.decode()


@pytest.mark.parametrize("label", ["nolabel", "=value"])
def test_a_label_without_key_and_value_is_a_usage_error(label):
    result = taskman("start", "--user-id", "client001", "--node-label", label, "--", "true")
    assert result.returncode == 2, result.stderr.decode()
    assert b"expected key=value" in result.stderr
    ran = taskman("run", "--user-id", "client001", "--node-label", label, "--", "true")
    assert ran.returncode == 125, ran.stderr.decode()


def test_the_request_carries_the_labels():
    from taskman.api import task_manager_pb2
    from taskman.cli.client import _node_labels

    labels = _node_labels({"--node-label": ["disk=ssd", "zone=a=b", "empty="]})
    assert labels == {"disk": "ssd", "zone": "a=b", "empty": ""}
    request = task_manager_pb2.StartTaskRequest(command="true", node_labels=labels)
    assert dict(request.node_labels) == labels
