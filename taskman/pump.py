"""Copying a task's output pipes into its output log, each chunk tagged.

One greenlet per pipe (one for a task's shared pipe, two when stdout and
stderr are apart): each waits on its own descriptor, so a quiet stream never
holds up a busy one. The log serialises their appends.
"""

import gevent

from taskman.output import OutputLog
from taskman.process import OutputPipe, Process

PAUSED_POLL = 0.05  # seconds
# Between reads of a task whose output is cut (its cap or its owner's output
# quota reached): the bytes are dropped, so reading them at full speed only
# takes the server's loop from everyone else. The pipe fills and the task's
# writes wait instead: ~25 MB/s of dropped output at most per pipe.
CAPPED_PAUSE = 0.01  # seconds


def pump(proc: Process, output: OutputLog) -> None:
    """Copy every output pipe of ``proc`` into ``output`` until all reach end of file.

    Killing this greenlet kills the copies too.
    """
    copies = [gevent.spawn(_copy, pipe, output) for pipe in proc.outputs]
    try:
        gevent.joinall(copies)
    finally:
        gevent.killall(copies)


def _copy(pipe: OutputPipe, output: OutputLog) -> None:
    while True:
        while pipe.paused:  # a reload: the bytes stay in the pipe for the next image
            gevent.sleep(PAUSED_POLL)
        data = pipe.read()
        if not data:
            return
        pipe.holding = True
        try:
            output.append(data, pipe.stream)
        finally:
            pipe.holding = False
        # A pipe that always has data never makes read() wait: without
        # this, a fast writer kept every other call waiting for seconds
        # (bench: GetTaskStatus p99 3.3 s during a 10 GiB write).
        gevent.sleep(CAPPED_PAUSE if output.capped else 0)
