"""The follower's reconnection across addresses (taskman.cli.follow), with a
stand-in client: which address and offset each attempt asks for, and when
it waits."""

import types

import pytest

from taskman.cli import follow


class Code:
    def __init__(self, name):
        self.name = name


class Failure(Exception):
    def __init__(self, code, message="gone"):
        super().__init__(message)
        self.code = Code(code)
        self.message = message


class Chunk:
    def __init__(self, data, offset):
        self.data, self.offset = data, offset

    @property
    def end(self):
        return self.offset + len(self.data)


class FakeClient:
    """``script``: one entry per attempt, (chunks to send, error or None)."""

    def __init__(self, addresses, script):
        self.addresses = list(addresses)
        self.current = 0
        self.script = list(script)
        self.asked = []  # (address, offset) of each attempt

    @property
    def address(self):
        return self.addresses[self.current]

    def fail_over(self):
        self.current = (self.current + 1) % len(self.addresses)
        return self.address

    def chunks(self, task_id, offset, **view):
        self.asked.append((self.address, offset))
        sizes, error = self.script.pop(0)
        for size in sizes:
            yield Chunk(b"x" * size, offset)
            offset += size
        if error:
            raise error


@pytest.fixture
def pauses(monkeypatch):
    slept = []
    monkeypatch.setattr(follow.time, "sleep", slept.append)
    return slept


def run(client, **options):
    received, notes = [], []
    follower = follow.Follower(client, "task", lambda chunk: received.append(chunk),
                               note=notes.append, **options)
    follower.run()
    return follower, received, notes


def test_a_lost_replica_is_followed_on_the_next_from_the_offset_reached(pauses):
    client = FakeClient(["a:1", "b:2"], [([3, 4], Failure("UNAVAILABLE")), ([5], None)])
    follower, received, notes = run(client)
    assert client.asked == [("a:1", 0), ("b:2", 7)]
    assert [chunk.offset for chunk in received] == [0, 3, 7] and follower.offset == 12
    assert pauses == [0.0]  # the first retry is immediate
    assert "reconnecting from offset 7 to b:2" in notes[0]


def test_a_server_side_cancel_is_resumed_too(pauses):
    client = FakeClient(["a:1"], [([2], Failure("CANCELLED")), ([1], None)])
    follower, _, _ = run(client)
    assert client.asked == [("a:1", 0), ("a:1", 2)] and follower.offset == 3


def test_later_retries_back_off_and_round_the_list(pauses):
    down = Failure("UNAVAILABLE", "connection refused")
    client = FakeClient(["a:1", "b:2", "c:3"],
                        [([1], down), ([], down), ([], down), ([], down), ([1], None)])
    run(client)
    assert [address for address, _ in client.asked] == ["a:1", "b:2", "c:3", "a:1", "b:2"]
    assert pauses == [0.0, follow.FIRST_PAUSE, follow.FIRST_PAUSE * 2, follow.FIRST_PAUSE * 4]


def test_the_retries_are_bounded(pauses):
    down = Failure("UNAVAILABLE")
    client = FakeClient(["a:1", "b:2"], [([1], down)] + [([], down)] * follow.RETRIES)
    with pytest.raises(Failure):
        run(client)
    assert len(client.asked) == follow.RETRIES + 1
    assert max(pauses) == follow.LONGEST_PAUSE


def test_bytes_received_renew_the_retry_budget(pauses):
    down = Failure("UNAVAILABLE")
    script = []
    for _ in range(3):  # three losses, each after some progress
        script += [([1], down)] + [([], down)] * (follow.RETRIES - 1)
    client = FakeClient(["a:1", "b:2"], script + [([1], None)])
    follower, _, _ = run(client)
    assert follower.offset == 4


def test_an_address_that_never_answered_passes_to_the_next_at_once(pauses):
    client = FakeClient(["a:1", "b:2"], [([], Failure("UNAVAILABLE", "connection refused")),
                                         ([2], None)])
    follower, _, notes = run(client)
    assert client.asked == [("a:1", 0), ("b:2", 0)] and follower.offset == 2
    assert pauses == [] and "trying b:2" in notes[0]


def test_with_one_address_that_never_answered_it_fails_at_once(pauses):
    client = FakeClient(["a:1"], [([], Failure("UNAVAILABLE"))])
    with pytest.raises(Failure):
        run(client)
    assert pauses == []


def test_when_no_address_ever_answered_the_last_failure_is_raised(pauses):
    client = FakeClient(["a:1", "b:2"], [([], Failure("UNAVAILABLE", "first")),
                                         ([], Failure("UNAVAILABLE", "second"))])
    with pytest.raises(Failure, match="second"):
        run(client)


def test_other_failures_are_not_retried(pauses):
    client = FakeClient(["a:1", "b:2"], [([1], Failure("NOT_FOUND"))])
    with pytest.raises(Failure):
        run(client)
    assert len(client.asked) == 1


@pytest.fixture
def clock(monkeypatch):
    """The follower's clock, moved on only by its own sleeps (``taken``)."""
    fake = types.SimpleNamespace(now=0.0, taken=[])

    def sleep(seconds):
        fake.taken.append(seconds)
        fake.now += seconds

    monkeypatch.setattr(follow.time, "monotonic", lambda: fake.now)
    monkeypatch.setattr(follow.time, "sleep", sleep)
    return fake


def test_a_reloading_server_is_waited_for_at_its_address_quietly(pauses, clock):
    pauses_taken = clock.taken
    refused = [([], Failure("UNAVAILABLE", "failed to connect: Connection refused"))] * 30
    client = FakeClient(["a:1"], [([3], Failure("UNAVAILABLE", "the server is reloading; reconnect")),
                                  *refused, ([4], None)])
    follower, received, notes = run(client)
    # Past the 11 retries a lasting loss gets, at the reload's pace, one note.
    assert len(client.asked) == 32 and set(client.asked[1:]) == {("a:1", 3)}
    assert pauses_taken == [follow.RELOAD_PAUSE] * 31
    assert len(notes) == 1 and "reloading" in notes[0] and "offset 3" in notes[0]
    assert follower.offset == 7


def test_a_reload_that_outlasts_the_wait_fails_as_a_lost_server(pauses, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(follow.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(follow.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    refused = Failure("UNAVAILABLE", "failed to connect: Connection refused")
    client = FakeClient(["a:1"], [([3], Failure("UNAVAILABLE", "the server is reloading"))]
                        + [([], refused)] * 1000)
    with pytest.raises(Failure):
        run(client)
    waited = clock[0]
    assert follow.RELOAD_WAIT <= waited < follow.RELOAD_WAIT + 30


def test_with_other_replicas_a_reload_is_failed_over_at_once(pauses):
    client = FakeClient(["a:1", "b:2"], [([3], Failure("UNAVAILABLE", "the server is reloading")),
                                         ([4], None)])
    follower, received, notes = run(client)
    assert client.asked == [("a:1", 0), ("b:2", 3)] and pauses == [0.0]


def test_a_lone_server_lost_without_a_word_is_asked_again_quickly_first(pauses, clock):
    # A reload's stop cancels a stream that was waiting to send when the
    # drain came: CANCELLED, no "reloading". With one address that loss is
    # retried every RELOAD_PAUSE (the first at once), not 0.2, 0.4, 0.8 s...
    taken = clock.taken
    refused = [([], Failure("UNAVAILABLE", "failed to connect: Connection refused"))] * 8
    client = FakeClient(["a:1"], [([3], Failure("CANCELLED", "Cancelled")), *refused, ([4], None)])
    follower, _, notes = run(client)
    assert set(client.asked[1:]) == {("a:1", 3)} and follower.offset == 7
    assert taken == [follow.RELOAD_PAUSE] * 8  # the first retry at once, no back-off
    assert len(notes) == 1 and "lost the server" in notes[0] and "offset 3" in notes[0]


def test_past_the_quick_retries_a_lost_server_backs_off(pauses, clock):
    taken = clock.taken
    down = Failure("UNAVAILABLE", "failed to connect: Connection refused")
    client = FakeClient(["a:1"], [([3], down)] + [([], down)] * 200)
    with pytest.raises(Failure):
        run(client)
    quick = [pause for pause in taken if pause == follow.RELOAD_PAUSE]
    assert follow.QUICK_WAIT <= len(quick) * follow.RELOAD_PAUSE < follow.QUICK_WAIT + 0.2
    backing_off = taken[len(quick):]
    assert backing_off[:3] == [0.0, follow.FIRST_PAUSE, follow.FIRST_PAUSE * 2]
    assert max(backing_off) == follow.LONGEST_PAUSE
