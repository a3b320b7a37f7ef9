"""Output views against real processes: stream tags, offsets, tails, since, no-follow.

A task started with separate streams has its stdout and stderr on two pipes
and every chunk tagged with its stream; a task started the RFD's way keeps
one pipe and its chunks are COMBINED. Offsets always count the combined output.
"""

import datetime
import os
import sys
import time

import gevent
import pytest

from support import poll_for
from taskman import cgroups
from taskman.manager import TaskManager
from taskman.output import OutputLog, Selector, Stream, create_log, reopen_log
from taskman.output_index import index_path

PY = sys.executable

# Alternates stdout and stderr, pausing so each write is read on its own.
INTERLEAVE = ("import os, time\n"
              "for i in range(20):\n"
              "    os.write(1, b'out%d\\n' % i)\n"
              "    time.sleep(0.002)\n"
              "    os.write(2, b'err%d\\n' % i)\n"
              "    time.sleep(0.002)\n")
STDOUT = b"".join(b"out%d\n" % i for i in range(20))
STDERR = b"".join(b"err%d\n" % i for i in range(20))


@pytest.fixture
def manager(state_dir):
    mgr = TaskManager(state_dir, driver=cgroups.select_driver("none"), stop_grace=1.0)
    yield mgr
    mgr.shutdown(timeout=10)


def wait_ended(mgr, task_id):
    return poll_for(lambda: (lambda t: t if not t.running else None)(mgr.status("alice", task_id)),
                    timeout=10, message=f"task {task_id} to end")


def chunks_of(mgr, task_id, **view):
    with gevent.Timeout(20):
        return list(mgr.chunks("alice", task_id, **view))


def output_of(mgr, task_id, **view):
    return b"".join(chunk.data for chunk in chunks_of(mgr, task_id, **view))


@pytest.fixture
def interleaved(manager):
    task = manager.start("alice", PY, ["-c", INTERLEAVE], separate_streams=True)
    wait_ended(manager, task.id)
    return task.id


def test_each_selector_is_byte_exact(manager, interleaved):
    assert output_of(manager, interleaved, selector=Selector.STDOUT) == STDOUT
    assert output_of(manager, interleaved, selector=Selector.STDERR) == STDERR
    chunks = chunks_of(manager, interleaved)
    assert {chunk.stream for chunk in chunks} == {Stream.STDOUT, Stream.STDERR}
    by_stream = {stream: b"".join(c.data for c in chunks if c.stream == stream)
                 for stream in (Stream.STDOUT, Stream.STDERR)}
    assert by_stream == {Stream.STDOUT: STDOUT, Stream.STDERR: STDERR}


def test_offsets_count_the_combined_output(manager, interleaved):
    chunks = chunks_of(manager, interleaved)
    combined = b"".join(chunk.data for chunk in chunks)
    assert len(combined) == len(STDOUT) + len(STDERR)
    position = 0
    for chunk in chunks:
        assert chunk.offset == position
        position += len(chunk.data)
    for selector in (Selector.STDOUT, Selector.STDERR):
        for chunk in chunks_of(manager, interleaved, selector=selector):
            assert combined[chunk.offset:chunk.offset + len(chunk.data)] == chunk.data
    middle = chunks[len(chunks) // 2].offset + 1
    rest = chunks_of(manager, interleaved, offset=middle)
    assert rest[0].offset == middle and b"".join(c.data for c in rest) == combined[middle:]
    assert b"".join(manager.stream("alice", interleaved, offset=middle)) == combined[middle:]


def test_one_pipe_keeps_the_exact_order_tagged_combined(manager):
    task = manager.start("alice", "sh", ["-c", "echo out; echo err >&2; echo out2"])
    wait_ended(manager, task.id)
    chunks = chunks_of(manager, task.id)
    assert b"".join(chunk.data for chunk in chunks) == b"out\nerr\nout2\n"
    assert {chunk.stream for chunk in chunks} == {Stream.COMBINED}
    assert output_of(manager, task.id, selector=Selector.STDOUT) == b""  # no stdout of its own


def test_timestamps_are_monotonic_and_when_read(manager, interleaved):
    chunks = chunks_of(manager, interleaved)
    times = [chunk.time_ns for chunk in chunks]
    assert times == sorted(times)
    task = manager.status("alice", interleaved)
    assert task.start_time.timestamp() * 1e9 - 1e6 <= times[0]
    assert times[-1] <= task.end_time.timestamp() * 1e9 + 1e6


def test_tail_on_a_finished_task(manager, interleaved):
    assert output_of(manager, interleaved, selector=Selector.STDERR, tail_lines=2) == b"err18\nerr19\n"
    assert output_of(manager, interleaved, selector=Selector.STDOUT, tail_bytes=8) == b"8\nout19\n"
    assert output_of(manager, interleaved, tail_bytes=6) == b"err19\n"
    everything = output_of(manager, interleaved)
    assert output_of(manager, interleaved, tail_lines=1000) == everything
    # A tail never starts before the requested offset.
    assert output_of(manager, interleaved, offset=len(everything) - 3, tail_lines=5) == b"19\n"

    task = manager.start("alice", "printf", ["a\nb\nc"])  # no newline at the end
    wait_ended(manager, task.id)
    assert output_of(manager, task.id, tail_lines=2) == b"b\nc"


def test_tail_and_no_follow_on_a_live_task(manager):
    task = manager.start("alice", "sh", ["-c", "seq 1 50; exec sleep 30"])
    poll_for(lambda: manager.status("alice", task.id).output_size == 141, timeout=5,
             message="the numbers to be written")
    started = time.monotonic()
    assert output_of(manager, task.id, tail_lines=2, follow=False) == b"49\n50\n"
    assert output_of(manager, task.id, tail_bytes=3, follow=False) == b"50\n"
    assert len(output_of(manager, task.id, follow=False)) == 141
    assert time.monotonic() - started < 1.0  # returned at once, the task runs on
    assert manager.status("alice", task.id).running
    # A following tail waits for more, and ends with the task.
    follower = gevent.spawn(output_of, manager, task.id, tail_lines=1)
    gevent.sleep(0.2)
    assert not follower.ready()
    manager.stop("alice", task.id)
    assert follower.get(timeout=10) == b"50\n"


def test_since_on_a_finished_task(manager):
    task = manager.start("alice", "sh", ["-c", "echo early; sleep 0.3; echo late"])
    wait_ended(manager, task.id)
    early = chunks_of(manager, task.id)[0]
    late = chunks_of(manager, task.id, offset=6)[0]  # dated by its own record
    # Read 0.3 s apart: a chunk each, each with its own time (records merge
    # into one chunk only within a millisecond, so --timestamps is right).
    assert (early.data, late.data) == (b"early\n", b"late\n")
    assert late.time_ns - early.time_ns >= 0.25e9
    between = datetime.datetime.fromtimestamp((early.time_ns + late.time_ns) / 2e9,
                                              datetime.timezone.utc)
    assert output_of(manager, task.id, since=between) == b"late\n"
    before = datetime.datetime.fromtimestamp(early.time_ns / 1e9 - 1, datetime.timezone.utc)
    assert output_of(manager, task.id, since=before) == b"early\nlate\n"
    assert output_of(manager, task.id, since=datetime.datetime.now(datetime.timezone.utc)) == b""


def test_views_survive_a_restart(state_dir, interleaved, manager):
    manager.shutdown(timeout=10)
    second = TaskManager(state_dir, driver=cgroups.select_driver("none"))
    try:
        assert output_of(second, interleaved, selector=Selector.STDERR) == STDERR
        assert {c.stream for c in chunks_of(second, interleaved)} == {Stream.STDOUT, Stream.STDERR}
    finally:
        second.shutdown(timeout=10)


def test_a_log_without_index_streams_whole(state_dir, manager):
    task = manager.start("alice", "sh", ["-c", "echo out; echo err >&2"], separate_streams=True)
    wait_ended(manager, task.id)
    manager.shutdown(timeout=10)
    os.unlink(index_path(manager.output_dir, task.id))  # as written before indexes existed
    second = TaskManager(state_dir, driver=cgroups.select_driver("none"))
    try:
        chunks = chunks_of(second, task.id)
        assert sorted(chunks[0].data.splitlines()) == [b"err", b"out"]
        assert [(c.offset, c.stream) for c in chunks] == [(0, Stream.COMBINED)]
        assert chunks[0].time_ns == int(task.start_time.timestamp() * 1e9)
        assert output_of(second, task.id, tail_lines=1, follow=False) in (b"out\n", b"err\n")
    finally:
        second.shutdown(timeout=10)


def test_output_log_views_without_a_process(tmp_path):
    os.mkdir(tmp_path / "output")
    log = create_log(str(tmp_path / "output"), "task")
    log.append(b"o1\n", Stream.STDOUT)
    log.append(b"e1\n", Stream.STDERR)
    log.append(b"o2\n", Stream.STDOUT)
    log.append(b"o3\n", Stream.STDOUT)
    log.finish()
    assert [(c.offset, c.stream, c.data) for c in log.chunks()] == [
        (0, Stream.STDOUT, b"o1\n"), (3, Stream.STDERR, b"e1\n"), (6, Stream.STDOUT, b"o2\no3\n")]
    assert list(log.follow(chunk_size=4)) == [b"o1\n", b"e1\n", b"o2\no", b"3\n"]
    assert [c.offset for c in log.chunks(selector=Selector.STDOUT)] == [0, 6]
    assert b"".join(log.follow(7)) == b"2\no3\n"
    log.remove()
    assert os.listdir(tmp_path / "output") == [] and os.listdir(tmp_path / "output-index") == []


def test_a_crash_cut_index_reads_the_rest_as_combined(tmp_path):
    os.mkdir(tmp_path / "output")
    log = create_log(str(tmp_path / "output"), "task")
    log.append(b"out\n", Stream.STDOUT)
    log.finish()
    with open(log.path, "ab") as file:  # bytes whose record was never written
        file.write(b"tail\n")
    old = reopen_log(str(tmp_path / "output"), "task")
    assert [(c.stream, c.data) for c in old.chunks()] == [(Stream.STDOUT, b"out\n"),
                                                           (Stream.COMBINED, b"tail\n")]


def test_plain_log_has_no_index(tmp_path):
    log = OutputLog(str(tmp_path / "a.log"))
    log.append(b"x", Stream.STDERR)
    log.finish()
    assert [(c.stream, c.data) for c in log.chunks()] == [(Stream.COMBINED, b"x")]
