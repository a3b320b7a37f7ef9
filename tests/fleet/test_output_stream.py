"""Output through the fleet: what a host publishes, followers on other
connections replay from the start (or an offset) and follow live, byte-exact."""

import hashlib
import os
import time
import uuid

import gevent
import gevent.event

from taskman.fleet import output
from taskman.output import Chunk
from taskman.output_index import Stream

CHUNK = 64 * 1024


def chunks_of(data, stream=Stream.COMBINED):
    for offset in range(0, len(data), CHUNK):
        yield Chunk(offset, stream, time.time_ns(), data[offset:offset + CHUNK])


def collect(connection, task_id, **options):
    return b"".join(chunk.data for chunk in output.follow(connection, task_id, **options))


def test_followers_on_three_connections_replay_and_follow_byte_exact(connect):
    host = connect("host")
    followers = [connect(f"replica{number}") for number in range(3)]
    task_id = str(uuid.uuid4())
    data = os.urandom(8 * 1024 * 1024 + 12345)
    publisher = output.Publisher(host, task_id)
    first = data[:3 * CHUNK]
    for chunk in chunks_of(first):
        publisher.publish(chunk)  # some output exists before anyone follows

    readers = [gevent.spawn(collect, follower, task_id) for follower in followers]
    gevent.sleep(0.2)
    rest = [chunk._replace(offset=chunk.offset + len(first)) for chunk in chunks_of(data[len(first):])]
    started = time.monotonic()
    publisher.pump(rest)
    gevent.joinall(readers, timeout=60, raise_error=True)
    elapsed = time.monotonic() - started
    expected = hashlib.sha256(data).hexdigest()
    assert [hashlib.sha256(reader.value).hexdigest() for reader in readers] == [expected] * 3
    print(f"8 MiB published and followed by 3 in {elapsed:.2f} s")


def test_a_late_follower_replays_from_an_offset(connect):
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    data = os.urandom(5 * CHUNK + 77)
    output.Publisher(host, task_id).pump(chunks_of(data))
    for offset in (0, 1, CHUNK, CHUNK + 5, len(data) - 1, len(data)):
        assert collect(replica, task_id, offset=offset) == data[offset:]


def test_labels_survive_the_trip(connect):
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    sent = [Chunk(0, Stream.STDOUT, 111, b"out\n"), Chunk(4, Stream.STDERR, 222, b"err\n")]
    output.Publisher(host, task_id).pump(sent)
    assert list(output.follow(replica, task_id)) == sent


def test_a_follower_of_a_running_task_without_live_stops_when_caught_up(connect):
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    publisher = output.Publisher(host, task_id)
    for chunk in chunks_of(b"x" * (2 * CHUNK)):
        publisher.publish(chunk)
    publisher.flush()  # stored: a chunk handed over may still be on its way
    with gevent.Timeout(10):
        assert collect(replica, task_id, live=False) == b"x" * (2 * CHUNK)


def test_cancelling_a_waiting_follower_ends_it(connect):
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    output.Publisher(host, task_id).publish(Chunk(0, Stream.COMBINED, 1, b"hi"))
    cancelled = gevent.event.Event()
    reader = gevent.spawn(collect, replica, task_id, cancelled=cancelled)
    gevent.sleep(0.5)
    assert not reader.ready()
    cancelled.set()
    reader.join(output.POLL + 3)
    assert reader.value == b"hi"


def test_forget_removes_a_tasks_output(connect):
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    output.Publisher(host, task_id).pump(chunks_of(b"y" * 100))
    output.forget(host, task_id)
    with gevent.Timeout(10):
        assert collect(replica, task_id, live=False) == b""


def test_chunks_stored_out_of_order_are_put_back_in_order(connect):
    # What a republish after a failed publish can store: a chunk after its successor.
    host, replica = connect("host"), connect("replica")
    task_id = str(uuid.uuid4())
    data = os.urandom(4 * CHUNK)
    chunks = list(chunks_of(data))
    publisher = output.Publisher(host, task_id)
    for chunk in (chunks[0], chunks[2], chunks[1], chunks[1], chunks[3]):
        publisher._publish(chunk.data, {output.OFFSET: str(chunk.offset), output.STREAM: "0",
                                        output.TIME: "1"})
    publisher.published = len(data)
    publisher.finish()
    assert collect(replica, task_id) == data
    assert collect(replica, task_id, offset=CHUNK + 3) == data[CHUNK + 3:]
