"""The fleet backend at the library level: real TaskManagers as two hosts,
real processes, the real cluster; start, status, stream and stop on other
replicas than the host that runs the task."""

import hashlib

import gevent
import pytest

from taskman.errors import CommandNotFound, NotFound, ResourceExhausted
from taskman.fleet.backend import Backend, FleetBackend, wait_ended
from taskman.fleet.worker import Worker
from taskman.manager import TaskManager
from taskman.task import JobStatus


@pytest.fixture
def fleet(connect, tmp_path):
    managers, workers = [], []
    for name in ("host1", "host2"):
        manager = TaskManager(state_dir=str(tmp_path / name), stop_grace=1.0)
        managers.append(manager)
        workers.append(Worker(connect(name), manager, capacity=4).start())
    replicas = [FleetBackend(connect(f"replica{number}")) for number in range(3)]
    yield replicas, workers
    for worker in workers:
        worker.stop()
    for manager in managers:
        manager.shutdown(timeout=5)


def test_both_backends_have_the_servicers_interface(fleet, tmp_path):
    replicas, workers = fleet
    assert isinstance(replicas[0], Backend)
    assert isinstance(workers[0].manager, Backend)


SCRIPT = "head -c 3000000 /dev/urandom | od -An -x; echo done"


def test_start_on_one_replica_status_and_stream_on_the_others(fleet):
    replicas, workers = fleet
    task = replicas[0].start("alice", "sh", ["-c", SCRIPT])
    assert task.running or task.status == JobStatus.EXITED_OK
    followers = [gevent.spawn(lambda replica=replica: b"".join(replica.stream("alice", task.id)))
                 for replica in replicas]
    gevent.joinall(followers, timeout=60, raise_error=True)
    final = wait_ended(replicas[1], "alice", task.id, 30)
    assert final.status == JobStatus.EXITED_OK and final.exit_code == 0
    host = next(worker for worker in workers if worker.node == replicas[2].records.get(task.id)[0].host)
    local = b"".join(host.manager.stream("alice", task.id))
    assert local.endswith(b"done\n") and len(local) > 3000000
    digests = {hashlib.sha256(follower.value).hexdigest() for follower in followers}
    assert digests == {hashlib.sha256(local).hexdigest()}
    assert final.output_size == len(local)


def test_stop_on_another_replica_than_the_start(fleet):
    replicas, _ = fleet
    task = replicas[0].start("alice", "sleep", ["60"])
    stopped = replicas[2].stop("alice", task.id)
    assert stopped.status == JobStatus.SIGNALED and stopped.signal == "SIGTERM"
    assert stopped.source.value == "user"


def test_others_tasks_are_not_found_and_admin_sees_all(fleet):
    replicas, _ = fleet
    task = replicas[0].start("alice", "true")
    with pytest.raises(NotFound):
        replicas[1].status("bob", task.id)
    with pytest.raises(NotFound):
        replicas[1].stop("bob", task.id)
    assert replicas[2].status("admin", task.id).owner == "alice"
    assert task.id in [listed.id for listed in replicas[1].tasks("admin")]
    assert task.id not in [listed.id for listed in replicas[1].tasks("bob")]


def test_an_unknown_command_is_the_hosts_error(fleet):
    replicas, _ = fleet
    with pytest.raises(CommandNotFound):
        replicas[1].start("alice", "no-such-command-anywhere")


def test_eight_tasks_spread_over_two_hosts(fleet):
    replicas, workers = fleet
    tasks = [replicas[number % 3].start("alice", "sleep", ["2"]) for number in range(8)]
    hosts = {replicas[0].records.get(task.id)[0].host for task in tasks}
    assert hosts == {worker.node for worker in workers}
    for task in tasks:
        assert wait_ended(replicas[0], "alice", task.id, 30).status == JobStatus.EXITED_OK


def test_labels_no_live_host_has_are_refused_at_once(fleet):
    replicas, _ = fleet
    with gevent.Timeout(5):
        with pytest.raises(ResourceExhausted, match="zone=mars"):
            replicas[0].start("alice", "true", node_labels={"zone": "mars"})


def test_the_running_tasks_quota_counts_the_whole_fleet(fleet, connect):
    replicas, _ = fleet
    quota = FleetBackend(connect("quota-replica"), running_quota=3)
    sleepers = [quota.start("carol", "sleep", ["60"]) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="running tasks 3 of 3 for carol"):
        quota.start("carol", "true")
    quota.start("dave", "true")  # another user's count
    gevent.sleep(1.5)  # the hosts' heartbeats now count carol's three, on both hosts
    with pytest.raises(ResourceExhausted):
        quota.start("carol", "true")
    replicas[1].stop("carol", sleepers[0].id)
    with gevent.Timeout(10):
        while True:
            gevent.sleep(0.5)
            try:
                quota.start("carol", "true")
                break
            except ResourceExhausted:
                continue
