"""Failures at the library level: a NATS node killed mid-stream, a host that
dies with tasks running."""

import hashlib
import os
import time
import uuid

import gevent
import pytest

from taskman.fleet import output
from taskman.fleet.backend import FleetBackend, wait_ended
from taskman.fleet.connection import OUTPUT_STREAM
from taskman.fleet.records import LOST
from taskman.fleet.worker import Worker
from taskman.manager import TaskManager
from taskman.output import Chunk
from taskman.output_index import Stream
from taskman.task import JobStatus

TTL = 3.0  # the suite's heartbeat TTL (conftest's connect)
CHUNK = 64 * 1024


def test_killing_the_output_streams_leader_loses_and_repeats_nothing(connect, cluster):
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    data = os.urandom(24 * 1024 * 1024)
    publisher = output.Publisher(host, task_id)

    def publish():
        for offset in range(0, len(data), CHUNK):
            publisher.publish(Chunk(offset, Stream.COMBINED, time.time_ns(),
                                    data[offset:offset + CHUNK]))
        publisher.finish()

    follower = gevent.spawn(lambda: b"".join(chunk.data for chunk in
                                             output.follow(replica, task_id)))
    writer = gevent.spawn(publish)
    while publisher.published < len(data) // 4:
        assert not writer.dead, writer.exception
        gevent.sleep(0.01)
    leader = host.call(host.jetstream.stream_info(OUTPUT_STREAM)).cluster.leader
    victim = cluster.node(leader)
    killed = time.monotonic()
    victim.kill()  # SIGKILL, mid-stream
    try:
        writer.join(120)
        assert writer.successful(), writer.exception
        print(f"publisher done {time.monotonic() - killed:.1f} s after the leader ({leader}) died")
        follower.join(60)
        assert follower.successful(), follower.exception
        assert hashlib.sha256(follower.value).digest() == hashlib.sha256(data).digest()
    finally:
        victim.restart()
        cluster.wait_healthy(cluster.nodes)


@pytest.fixture
def two_hosts(connect, tmp_path):
    managers, workers = [], []
    for name in ("host1", "host2"):
        manager = TaskManager(state_dir=str(tmp_path / name), stop_grace=1.0)
        managers.append(manager)
        workers.append(Worker(connect(name), manager, capacity=4).start())
    yield workers
    for worker in workers:
        worker.stop()
    for manager in managers:
        manager.shutdown(timeout=5)


def test_a_dead_hosts_tasks_are_recorded_lost_and_new_tasks_go_to_the_survivor(connect, two_hosts):
    replica = FleetBackend(connect("replica"))
    tasks = [replica.start("alice", "sleep", ["60"]) for _ in range(4)]
    records = {task.id: replica.records.get(task.id)[0].host for task in tasks}
    doomed = next(worker for worker in two_hosts if worker.node in records.values())
    survivor = next(worker for worker in two_hosts if worker is not doomed)
    on_doomed = [task_id for task_id, host in records.items() if host == doomed.node]

    # The host dies: no more heartbeats, no clean leave, no claims.
    doomed.claimer.stop()
    doomed.heartbeat.stop(remove=False)
    died = time.monotonic()
    deadline = died + TTL + TTL / 3 + 3
    for task_id in on_doomed:
        while replica.status("alice", task_id).running:
            assert time.monotonic() < deadline, "a dead host's task was not recorded lost in time"
            gevent.sleep(0.1)
        task = replica.status("alice", task_id)
        assert task.status == JobStatus.UNKNOWN
        assert replica.records.get(task_id)[0].source == LOST
    print(f"{len(on_doomed)} task(s) recorded lost {time.monotonic() - died:.1f} s after their "
          f"host's last heartbeat (TTL {TTL})")
    fresh = replica.start("alice", "true")
    assert replica.records.get(fresh.id)[0].host == survivor.node
    assert wait_ended(replica, "alice", fresh.id, 20).status == JobStatus.EXITED_OK
