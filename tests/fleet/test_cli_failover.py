"""The CLI given every replica's address (--server-address a,b,c): a
follower whose replica is killed goes on from another, byte-exact, and
unary calls pass over the dead replica. Uses the end-to-end fleet of
test_e2e (three servers, one 3-node NATS cluster)."""

import subprocess
import time
import uuid

import pytest
import server_harness
from test_e2e import NODES, Fleet, check_checksummed, checksummed


@pytest.fixture(scope="module")
def fleet(nats_server_binary, tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("failover"), nats_server_binary) as fleet:
        yield fleet


def follow(fleet, task_id: str, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*server_harness.program("taskman"), "stream", task_id, "--user-id", "client001",
         "--server-address", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=server_harness.program_env(fleet.env))


def addresses(fleet, *names):
    return ",".join(fleet.servers[name].address for name in names)


@pytest.mark.timeout(300)
def test_a_follower_survives_the_death_of_its_replica(fleet):
    marker = f"failover-{uuid.uuid4().hex[:8]}"
    task_id = fleet.start_task(*checksummed(pause=0.5), marker, on="a")
    hosts = fleet.hosts_of(marker)
    host = next(name for name, count in hosts.items() if count)
    replica = next(name for name in NODES if name != host)
    other = next(name for name in NODES if name not in (host, replica))
    follower = follow(fleet, task_id, addresses(fleet, replica, other))
    time.sleep(2.0)
    fleet.servers[replica].kill()
    try:
        output, errors = follower.communicate(timeout=120)
        errors = errors.decode()
        assert follower.returncode == 0, errors
        assert "reconnecting from offset" in errors, errors
        assert fleet.servers[other].address in errors, errors
        check_checksummed(output)
        # Unary calls skip the dead replica too.
        status = server_harness.taskman(
            "get-status", task_id, "--user-id", "client001", "--server-address",
            addresses(fleet, replica, other), env=fleet.env)
        assert status.returncode == 0, status.stderr.decode()
    finally:
        fleet.restart(replica)
