"""Task records (compare-and-swap) and dispatch (exactly one host runs a start)
against the real 3-node cluster, at the library level."""

import uuid

import gevent
import pytest

from taskman.errors import CommandNotFound, NotFound, ResourceExhausted
from taskman.fleet import dispatch, offers
from taskman.fleet.connection import DISPATCH_SUBJECT
from taskman.fleet.records import CLAIMED, REFUSED, RUNNING, Conflict, Record, Records


def new_record(owner="alice"):
    return Record(id=str(uuid.uuid4()), owner=owner, command="true", args=["a b", "c"])


def test_a_record_round_trips_and_converts_to_a_task(connect):
    records = Records(connect())
    record = new_record()
    records.create(record)
    stored, revision = records.get(record.id)
    assert stored == record and revision > 0
    task = stored.to_task()
    assert (task.id, task.owner, task.command, task.args) == (record.id, "alice", "true", ["a b", "c"])
    assert task.running


def test_create_refuses_an_existing_id(connect):
    records = Records(connect())
    record = new_record()
    records.create(record)
    with pytest.raises(Conflict):
        records.create(record)


def test_a_stale_revision_loses_the_swap(connect):
    records = Records(connect("a"))
    other = Records(connect("b"))
    record = new_record()
    records.create(record)
    mine, revision = records.get(record.id)
    theirs, their_revision = other.get(record.id)
    theirs.phase = CLAIMED
    other.update(theirs, their_revision)
    mine.phase = REFUSED
    with pytest.raises(Conflict):
        records.update(mine, revision)
    assert records.get(record.id)[0].phase == CLAIMED


def test_concurrent_modifies_all_land(connect):
    records = Records(connect())
    record = new_record()
    records.create(record)

    def bump(record):
        record.output_size += 1
        return True

    writers = [gevent.spawn(records.modify, record.id, bump) for _ in range(20)]
    gevent.joinall(writers, timeout=30, raise_error=True)
    assert records.get(record.id)[0].output_size == 20


def test_a_missing_record_is_not_found(connect):
    with pytest.raises(NotFound):
        Records(connect()).get(str(uuid.uuid4()))


class Host:
    """A claimer whose ``run`` only counts: which tasks it was asked to start."""

    def __init__(self, connection, capacity=100, fail=None, labels=None):
        connection.settings.labels = dict(labels or {})
        self.records = Records(connection)
        self.ran = []
        self.capacity = capacity
        self.fail = fail
        self.claimer = dispatch.Claimer(connection, self.records, self.run,
                                        lambda: self.capacity - len(self.ran))

    def run(self, record):
        if self.fail:
            raise self.fail
        self.ran.append(record.id)
        return 4242


@pytest.fixture
def hosts(connect):
    started = []

    def make(name, **options):
        host = Host(connect(name), **options)
        started.append(host.claimer.start())
        return host

    yield make
    for claimer in started:
        claimer.stop()


def test_a_start_on_one_replica_runs_on_exactly_one_host(connect, hosts):
    workers = [hosts(name) for name in ("h1", "h2", "h3")]
    replica = Records(connect("replica"))
    record = new_record()
    placed = offers.place(replica, record, timeout=10)
    assert placed.phase == RUNNING and placed.pid == 4242
    assert placed.host in {worker.claimer.node for worker in workers}
    gevent.sleep(0.5)
    assert sum(worker.ran.count(record.id) for worker in workers) == 1
    stored = replica.get(record.id)[0]
    assert (stored.phase, stored.pid, stored.host) == (RUNNING, 4242, placed.host)


def test_duplicate_deliveries_never_run_a_task_twice(connect, hosts):
    workers = [hosts(name) for name in ("h1", "h2", "h3")]
    replica = Records(connect("replica"))
    connection = replica.connection
    ids = []
    for _ in range(20):
        record = new_record()
        assert offers.place(replica, record, timeout=10).phase == RUNNING
        ids.append(record.id)
        for copy in range(3):  # as a redelivery past the duplicate window would
            connection.call(connection.jetstream.publish(
                f"{DISPATCH_SUBJECT}.{record.id}", new_record_like(record).encode(),
                headers={"Nats-Msg-Id": f"again-{copy}-{record.id}"}))
    gevent.sleep(1.0)  # time for every copy to be delivered and dropped
    ran = [task_id for worker in workers for task_id in worker.ran]
    assert sorted(ran) == sorted(ids)
    assert all(worker.ran for worker in workers), "a pull-based queue spreads the work"


def new_record_like(record):
    return Record(id=record.id, owner=record.owner, command=record.command, args=record.args)


def test_a_claim_of_a_claimed_task_does_nothing(connect):
    host = Host(connect("h1"))
    record = new_record()
    assert host.claimer.claim(new_record_like(record)) is True
    assert host.claimer.claim(new_record_like(record)) is False
    assert host.ran == [record.id]


def test_no_host_with_room_is_resource_exhausted_and_final(connect, hosts):
    full = hosts("full", capacity=0)
    replica = Records(connect("replica"))
    record = new_record()
    with pytest.raises(ResourceExhausted):
        offers.place(replica, record, timeout=1.0)
    assert replica.get(record.id)[0].phase == REFUSED
    full.capacity = 10  # room now: the late claim loses the CAS, nothing runs
    gevent.sleep(1.5)
    assert full.ran == []


def test_a_hosts_refusal_reaches_the_replica_as_its_own_error(connect, hosts):
    hosts("h1", fail=CommandNotFound("command 'nope' not found"))
    replica = Records(connect("replica"))
    record = new_record()
    with pytest.raises(CommandNotFound, match="nope"):
        offers.place(replica, record, timeout=10)
    assert replica.get(record.id)[0].phase == REFUSED


def test_an_offer_has_no_record_until_a_host_claims_it(connect, hosts):
    replica = Records(connect("replica"))
    record = new_record()
    placing = gevent.spawn(offers.place, replica, record, 10)
    gevent.sleep(0.5)
    with pytest.raises(NotFound):
        replica.get(record.id)
    hosts("late")
    assert placing.get(timeout=10).phase == RUNNING


def test_a_start_requiring_labels_runs_only_on_a_host_with_them_all(connect, hosts):
    plain = hosts("plain")
    partial = hosts("partial", labels={"zone": "a"})
    labelled = hosts("labelled", labels={"zone": "a", "gpu": "yes"})
    replica = Records(connect("replica"))
    for _ in range(6):
        record = new_record()
        record.labels = {"zone": "a", "gpu": "yes"}
        assert offers.place(replica, record, timeout=10).host == labelled.claimer.node
    assert len(labelled.ran) == 6 and not plain.ran and not partial.ran
    record = new_record()  # no labels: anyone
    assert offers.place(replica, record, timeout=10).phase == RUNNING


def test_labels_no_host_has_are_refused(connect, hosts):
    hosts("plain")
    replica = Records(connect("replica"))
    record = new_record()
    record.labels = {"zone": "nowhere"}
    with pytest.raises(ResourceExhausted):
        offers.place(replica, record, timeout=1.0)
