"""``taskman run``: a remote command that behaves like a local one, for CI jobs.

Starts the task with its stdout and stderr apart, copies each to the same
descriptor here as it comes, and exits with the task's status (128+N for a
signal, as shells report it). Any failure of taskman itself exits 125, as
``docker run`` does, so it never passes for the task's own code. The first
Ctrl-C asks the server to stop the task and waits for it to end (exit 130);
a second one leaves at once, naming the task on stderr (exit 130).
"""

import signal
import sys
import threading
import time
from typing import Optional

from taskman.cli.follow import Follower
from taskman.cli.formats import json_line, status_object
from taskman.cli.messages import EXIT_INTERRUPTED, EXIT_TASKMAN_FAILED, describe_error

SIGNAL_BASE = 128
STATUS_POLL = 0.1  # seconds between status calls once the output has ended


class Detach(BaseException):
    """The second Ctrl-C: leave now, the task goes on (or finishes stopping)."""


def exit_status(status) -> int:
    """The shell's exit status for a finished task's taskman.client.TaskStatus."""
    if status.status == "JOB_STATUS_SIGNALED" and status.termination_signal:
        try:
            return SIGNAL_BASE + signal.Signals[status.termination_signal]
        except KeyError:
            return EXIT_TASKMAN_FAILED
    if status.exit_code is not None:
        return status.exit_code
    return EXIT_TASKMAN_FAILED  # ended in a state without a code (UNKNOWN)


def run(client, command: str, args: list, output_format: str = "table",
        node_labels: Optional[dict] = None) -> int:
    """Run ``command args...`` through ``client`` (a TaskmanClient); return the exit status."""
    client_errors = _client_errors()
    try:
        task_id = client.start(command, args, separate_streams=True, node_labels=node_labels)
    except client_errors as error:
        print(f"taskman: {describe_error(error)}", file=sys.stderr)
        return EXIT_TASKMAN_FAILED
    interrupt = _Interrupt(client, task_id)
    previous = signal.signal(signal.SIGINT, interrupt.handle)
    try:
        follower = Follower(client, task_id, _writer(), connected=True)
        follower.run()
        status = client.status(task_id)
        while status.running:
            # The output can end before the task does (its pipes closed, or
            # read to the end just before it was reaped), or the stream ended
            # with a server going down: wait for the end, output included.
            time.sleep(STATUS_POLL)
            follower.run()
            status = client.status(task_id)
    except Detach:
        print(f"taskman: detached from task {task_id} (it may still be running)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except client_errors as error:
        print(f"taskman: task {task_id}: {describe_error(error)}", file=sys.stderr)
        return EXIT_TASKMAN_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.stdout.flush()
    if output_format == "json":
        print(json_line(status_object(status)), file=sys.stderr, flush=True)
    if interrupt.count:
        return EXIT_INTERRUPTED
    return exit_status(status)


def _writer():
    """Each chunk to the descriptor it came from (stdout for combined output)."""
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer

    def write(chunk) -> None:
        out = stderr if chunk.stream == "stderr" else stdout
        out.write(chunk.data)
        out.flush()

    return write


def _client_errors():
    from taskman.client import ClientError

    return ClientError


class _Interrupt:
    """SIGINT while following: the first asks the server to stop the task (in
    a thread, so the output keeps flowing until the task ends); the second
    raises Detach in the main thread."""

    def __init__(self, client, task_id: str):
        self.client = client
        self.task_id = task_id
        self.count = 0

    def handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise Detach()
        print(f"taskman: stopping task {self.task_id} (Ctrl-C again to leave it running)",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        try:
            self.client.stop(self.task_id)
        except Exception as error:  # the stream or the status call reports the server's state
            print(f"taskman: could not stop task {self.task_id}: "
                  f"{getattr(error, 'message', error)}", file=sys.stderr, flush=True)
