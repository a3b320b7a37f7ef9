"""OutputLog: appends, followers, wake-ups, descriptors, caps and a full disk."""

import os

import gevent
import gevent.event
import pytest

from support import poll_for, small_tmpfs
from taskman.output import OutputLog, create_log, log_path
from taskman.output_index import index_directory, index_path


def open_fds(directory):
    """Descriptors of this process open on files in ``directory``."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith(str(directory))
        except OSError:
            pass
    return count


def test_followers_wake_on_each_append(tmp_path):
    log = OutputLog(str(tmp_path / "a.log"))
    got = []
    follower = gevent.spawn(lambda: [got.append(chunk) for chunk in log.follow()])
    for i in range(5):
        log.append(b"%d" % i)
        expected = b"".join(b"%d" % j for j in range(i + 1))
        poll_for(lambda expected=expected: b"".join(got) == expected, timeout=2)
    log.finish()
    follower.get(timeout=2)
    assert b"".join(got) == b"01234"


def test_follow_from_offset_and_read(tmp_path):
    log = OutputLog(str(tmp_path / "a.log"))
    log.append(b"hello world")
    log.finish()
    assert b"".join(log.follow(6)) == b"world"
    assert log.read(0, 5) == b"hello" and log.read(100) == b""


def test_chunks_are_bounded(tmp_path):
    log = OutputLog(str(tmp_path / "a.log"))
    log.append(b"x" * 200_000)
    log.finish()
    chunks = list(log.follow(chunk_size=65536))
    assert [len(c) for c in chunks] == [65536, 65536, 65536, 3392]


def test_finished_log_holds_no_descriptor(tmp_path):
    logs = [OutputLog(str(tmp_path / f"{i}.log")) for i in range(50)]
    assert open_fds(tmp_path) == 50
    for log in logs:
        log.append(b"data")
        log.finish()
    assert open_fds(tmp_path) == 0
    reader = logs[0].follow()
    assert next(reader) == b"data" and open_fds(tmp_path) == 1
    assert list(reader) == [] and open_fds(tmp_path) == 0


def test_existing_log_is_readable_and_finished(tmp_path):
    path = tmp_path / "old.log"
    path.write_bytes(b"from an earlier life")
    log = OutputLog(str(path), existing=True)
    assert log.finished and log.size == 20
    assert b"".join(log.follow()) == b"from an earlier life"


def test_cap_drops_the_excess_after_a_marker_line(tmp_path):
    log = OutputLog(str(tmp_path / "a.log"), max_bytes=100)
    marker = b"\n[taskman: output cap of 100 bytes reached; the rest is dropped]\n"
    room = 100 - len(marker)
    log.append(b"1" * (room - 5))
    assert not log.capped and log.note == ""
    log.append(b"abcdefghij")
    log.append(b"more")
    log.finish()
    assert b"".join(log.follow()) == b"1" * (room - 5) + b"abcde" + marker
    assert log.size == 100 and log.dropped == 5 + 4 and log.capped
    assert "100-byte cap" in log.note


def test_cancel_wakes_a_waiting_follower(tmp_path):
    log = OutputLog(str(tmp_path / "a.log"))
    cancelled = gevent.event.Event()
    follower = gevent.spawn(lambda: list(log.follow(cancelled=cancelled)))
    gevent.sleep(0.05)
    cancelled.set()
    assert follower.get(timeout=1) == []


@pytest.fixture
def tiny_disk(tmp_path):
    with small_tmpfs(tmp_path / "tiny", "64k") as mount:
        yield mount


def test_full_disk_drops_output_but_keeps_going(tiny_disk):
    log = OutputLog(str(tiny_disk / "a.log"))
    for _ in range(40):
        log.append(b"z" * 4096)  # 160 KiB into 64 KiB
    log.finish()
    assert log.write_error and "No space left" in log.write_error
    assert log.size + log.dropped == 40 * 4096
    assert 0 < log.size <= 64 * 1024
    assert b"".join(log.follow()) == b"z" * log.size


def test_finish_waits_for_a_write_left_running_by_a_killed_writer(tmp_path, monkeypatch):
    import taskman.output as output_module

    log = OutputLog(str(tmp_path / "a.log"))
    real_write = os.write
    writing = []

    def slow_write(fd, data):
        import time
        writing.append(fd)
        time.sleep(0.3)  # in the pool's thread: a write throttled by the kernel
        return real_write(fd, data)

    monkeypatch.setattr(output_module.os, "write", slow_write)
    writer = gevent.spawn(log.append, b"late bytes")
    poll_for(lambda: writing, timeout=5, interval=0.001, message="the write to start")
    writer.kill()  # as the supervisor does to a pump that outlived EOF_TIMEOUT
    log.finish()  # must not close the descriptor under the running write
    assert (tmp_path / "a.log").read_bytes() == b"late bytes"


def test_a_follower_that_keeps_up_gets_the_appended_bytes_themselves(tmp_path):
    """No pread of what was just written: every follower keeping up shares
    the appended object (one copy for 1,000 followers, not one each), and
    the log keeps it only while someone reads."""
    log = OutputLog(str(tmp_path / "a.log"))
    followers = [log.chunks() for _ in range(3)]
    data = b"x" * 100_000
    log.append(data)
    chunks = [next(follower) for follower in followers]
    assert all(chunk.data is data for chunk in chunks)
    for follower in followers:
        follower.close()
    assert log._recent.data == b""  # nobody reads: nothing kept
    log.append(b"more")
    log.finish()
    assert b"".join(log.follow()) == data + b"more"
    assert b"".join(log.follow(99_998)) == b"xxmore"


def test_create_log_makes_the_indexes_directory_only_when_it_is_missing(tmp_path, monkeypatch):
    """A start creates its two files; the indexes' directory is made when
    missing (the first start, or removed since), not tried at every start."""
    output = tmp_path / "output"
    output.mkdir()
    made = []
    real_makedirs = os.makedirs
    monkeypatch.setattr(os, "makedirs", lambda path, *args, **options:
                        made.append(path) or real_makedirs(path, *args, **options))
    first = create_log(str(output), "first")
    assert made == [index_directory(str(output))]
    second = create_log(str(output), "second")
    assert made == [index_directory(str(output))]
    for name in ("first", "second"):
        assert os.path.exists(log_path(str(output), name)) and os.path.exists(index_path(str(output), name))
    first.remove()
    second.remove()
    os.rmdir(index_directory(str(output)))
    create_log(str(output), "third")
    assert len(made) == 2 and os.path.exists(index_path(str(output), "third"))


def test_a_caught_up_follower_of_a_chatty_task_gets_its_lines_together(tmp_path, monkeypatch):
    # Lines appended one at a time, the follower given the loop after each:
    # without the linger each line is a message of its own.
    monkeypatch.setattr("taskman.output_reading.LINGER", 0.5)
    log = OutputLog(str(tmp_path / "a.log"))
    chunks = []
    follower = gevent.spawn(lambda: [chunks.append(chunk) for chunk in log.follow()])
    lines = [b"%d\n" % i for i in range(40)]
    for line in lines:
        log.append(line)
        gevent.sleep(0)
        gevent.sleep(0)
    log.finish()
    follower.get(timeout=5)
    assert b"".join(chunks) == b"".join(lines)
    assert len(chunks) <= 3, [len(chunk) for chunk in chunks]  # the first at once, the rest lingered


def test_a_waiting_follower_lingers_only_while_less_than_a_chunk_waits(tmp_path, monkeypatch):
    monkeypatch.setattr("taskman.output_reading.LINGER", 60)
    log = OutputLog(str(tmp_path / "a.log"))
    chunks = []
    follower = gevent.spawn(lambda: [chunks.append(chunk) for chunk in log.follow()])
    log.append(b"first\n")
    poll_for(lambda: chunks, timeout=5)  # the first output after a silence goes at once
    log.append(b"x" * 300_000)  # more than a chunk waiting: no linger either
    poll_for(lambda: sum(map(len, chunks)) == 300_006, timeout=5)
    cancelled = gevent.event.Event()
    late = []
    lingering = gevent.spawn(lambda: [late.append(chunk.data) for chunk in
                                      log.chunks(offset=300_005, cancelled=cancelled)])
    gevent.sleep(0.01)  # it has sent the last x and waits
    log.append(b"y")
    gevent.sleep(0.05)  # woken by the y so soon after the x: it lingers
    assert late == [b"x"]
    cancelled.set()  # a follower that goes away is not held by its linger
    lingering.get(timeout=5)
    follower.kill()
