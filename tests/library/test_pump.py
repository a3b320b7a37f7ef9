"""The output pump (taskman/pump.py): a pipe whose output is being dropped
(cap or quota reached) is read with a pause, so it cannot take the loop."""

import pytest

from taskman import pump

pytestmark = pytest.mark.timeout(10)


class Pipe:
    def __init__(self, reads):
        self.reads = reads
        self.paused = False
        self.holding = False
        self.stream = "combined"

    def read(self):
        if not self.reads:
            return b""
        self.reads -= 1
        return b"y" * 4096


class Log:
    def __init__(self, capped):
        self.capped = capped
        self.appended = 0

    def append(self, data, stream):
        self.appended += len(data)


@pytest.mark.parametrize("capped", [False, True])
def test_dropped_output_is_read_with_a_pause(capped, monkeypatch):
    pauses = []
    monkeypatch.setattr(pump.gevent, "sleep", pauses.append)
    log = Log(capped)
    pump._copy(Pipe(20), log)
    assert log.appended == 20 * 4096  # every read still goes to the log (which drops it)
    assert pauses == [pump.CAPPED_PAUSE if capped else 0] * 20
