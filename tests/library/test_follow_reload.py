"""A follower's first retry after a reload's message (taskman.cli.follow):
at once when it was behind, RELOAD_PAUSE when it kept up."""

import datetime

import pytest

from taskman.cli import follow
from taskman.client import OutputChunk


class Failure(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = type("Code", (), {"name": code})()
        self.message = message


class Client:
    """One address; the first stream sends a chunk the server read
    ``read_ago`` seconds ago and ends with the reload's drain; a refused
    attempt follows, then the rest of the output."""

    address = "a:1"
    addresses = ["a:1"]

    def __init__(self, read_ago: float):
        self.read_ago = read_ago
        self.asked = []

    def chunks(self, task_id, offset, **view):
        self.asked.append(offset)
        if len(self.asked) == 1:
            read_at = datetime.datetime.now(datetime.timezone.utc) - \
                datetime.timedelta(seconds=self.read_ago)
            yield OutputChunk(data=b"0\n", offset=0, stream="stdout", time=read_at)
            raise Failure("UNAVAILABLE", "the server is reloading; reconnect")
        if len(self.asked) == 2:
            raise Failure("UNAVAILABLE", "failed to connect: Connection refused")
        yield OutputChunk(data=b"1\n", offset=offset, stream="stdout", time=None)


@pytest.mark.parametrize("read_ago, first", [(2.0, 0.0), (0.0, follow.RELOAD_PAUSE)])
def test_the_first_retry_after_a_reload_waits_only_as_long_as_the_follower_was_not_behind(
        monkeypatch, read_ago, first):
    slept = []
    monkeypatch.setattr(follow.time, "sleep", slept.append)
    client = Client(read_ago)
    received = []
    follow.Follower(client, "task", received.append, note=lambda text: None).run()
    assert client.asked == [0, 2, 2] and [chunk.data for chunk in received] == [b"0\n", b"1\n"]
    assert slept[0] == pytest.approx(first, abs=0.05)
    assert slept[1:] == [follow.RELOAD_PAUSE]  # then the reload's pace
