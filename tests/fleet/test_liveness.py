"""Heartbeats expire in the real cluster, a silent host's tasks are recorded
lost, and a host cut off from the fleet fences its tasks first."""

import time
import uuid

import gevent

from taskman.fleet import liveness
from taskman.fleet.records import ENDED, LOST, RUNNING, Record, Records
from taskman.task import JobStatus

TTL = 3.0  # the suite's bucket TTL (conftest's connect)


def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.05)


def heartbeat(connection, fence=lambda: None, **options):
    return liveness.Heartbeat(connection, lambda: {"capacity": 4, "running": 0},
                              fence, **options)


def test_a_beating_host_is_live_and_a_silent_one_expires_within_the_ttl(connect):
    host, replica = connect("host"), connect("replica")
    beat = heartbeat(host).start()
    node = host.settings.node
    assert liveness.live_hosts(replica)[node]["capacity"] == 4
    gevent.sleep(TTL * 1.5)  # well past one TTL: the beats keep it alive
    assert node in liveness.live_hosts(replica)
    beat.stop(remove=False)  # dies: no clean leave
    silent = time.monotonic()
    wait_for(lambda: node not in liveness.live_hosts(replica), TTL + 3)
    print(f"heartbeat expired {time.monotonic() - silent:.2f} s after the last beat (TTL {TTL})")


def test_a_clean_leave_removes_the_host_at_once(connect):
    host, replica = connect("host"), connect("replica")
    beat = heartbeat(host).start()
    beat.stop(remove=True)
    assert host.settings.node not in liveness.live_hosts(replica)


def running_on(records, host):
    record = Record(id=str(uuid.uuid4()), owner="alice", command="sleep", args=["60"],
                    phase=RUNNING, host=host, pid=1234)
    records.create(record)
    return record


def test_tasks_of_a_host_that_is_not_live_are_recorded_lost(connect):
    host, replica = connect("host"), connect("replica")
    records = Records(replica)
    beat = heartbeat(host).start()
    try:
        alive = running_on(records, host.settings.node)
        orphan = running_on(records, "a-host-that-died")
        marked = liveness.mark_lost(records, liveness.live_hosts(replica))
        assert orphan.id in marked and alive.id not in marked
        lost, _ = records.get(orphan.id)
        assert (lost.phase, lost.status, lost.source) == (ENDED, int(JobStatus.UNKNOWN), LOST)
        task = lost.to_task()
        assert task.status == JobStatus.UNKNOWN and task.end_time is not None
        assert records.get(alive.id)[0].phase == RUNNING
        assert liveness.mark_lost(records, liveness.live_hosts(replica)) == []  # once only
    finally:
        beat.stop()


class Unreachable:
    """A hosts bucket whose puts fail, as when the host is cut off."""

    def put(self, key, value):
        async def fail():
            raise ConnectionError("cut off")
        return fail()

    def delete(self, key):
        return self.put(key, b"")


def test_a_cut_off_host_fences_before_it_is_recorded_lost(connect):
    host, replica = connect("host"), connect("replica")
    records = Records(replica)
    fenced_at = []
    beat = heartbeat(host, fence=lambda: fenced_at.append(time.monotonic())).start()
    task = running_on(records, host.settings.node)
    detector = liveness.LostDetector(replica, records, interval=0.2).start()
    try:
        gevent.sleep(TTL / 6)
        host.hosts = Unreachable()
        cut = time.monotonic()
        wait_for(lambda: records.get(task.id)[0].phase == ENDED, TTL * 3)
        lost_at = time.monotonic()
        assert fenced_at, "the host must stop its tasks before they are recorded lost"
        assert fenced_at[0] < lost_at
        print(f"cut off -> fenced {fenced_at[0] - cut:.2f} s, recorded lost {lost_at - cut:.2f} s"
              f" (TTL {TTL})")
    finally:
        detector.stop()
        beat.stop(remove=False)
