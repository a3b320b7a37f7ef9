"""The reload procedure: SIGHUP's handler in the old image, and the steps
from the check of the new image to its exec (taskman.reload holds the OS
calls, taskman.adoption the manager's side).

taskman.server passes its gRPC server in: nothing here imports grpc.
"""

import logging
import os
import signal
import sys
import time
from typing import List, Optional

import gevent
import gevent.event

from taskman import adoption, reload_timeline
from taskman import handover as handover_format
from taskman.reload import (
    PROGRAM,
    Guard,
    ReloadRefused,
    block_signal,
    boost_autogroup,
    boost_priority,
    check,
    exec_image,
    installed_program,
    restore_autogroup,
    restore_priority,
    unblock_signal,
)

log = logging.getLogger("taskman.reload")

PAUSE_TIMEOUT = 10.0  # seconds for the pumps to put down what they read
STOP_GRACE = 0.25  # seconds in-flight (unary, fast) calls get before the exec; streams resume


class StopDeadlines(dict):
    """Task id -> when its stop's SIGKILL is due (time.monotonic(), which
    is system-wide and so survives the exec): a manager listener."""

    def __init__(self, grace: float):
        super().__init__()
        self.grace = grace

    def __call__(self, event: str, task) -> None:
        if event == "stopping":
            self[task.id] = time.monotonic() + self.grace
        elif event == "ended":
            self.pop(task.id, None)


class Reloader:
    """SIGHUP's handler and the reload it leads to.

    ``request`` (the signal's greenlet) runs the new image's ``--check``;
    if it passes, it sets ``requested`` and wakes ``wake`` (the server's
    main greenlet, which then calls ``reexec``). A failing check leaves the
    server as it was: an ERROR line and a ``server.reload_refused`` event.
    """

    def __init__(self, manager, audit, wake: gevent.event.Event,
                 options: Optional[List[str]] = None):
        self.audit = audit
        self.wake = wake
        self.options = list(sys.argv[1:] if options is None else options)
        self.guard = Guard()
        self.requested = False
        self.terminating = False  # SIGTERM or SIGINT came: no reload, a stop
        self.program = ""
        self.autogroup_nice = None  # to go back to (taskman.reload.boost_autogroup)
        self.manager = manager
        self.stop_deadlines = StopDeadlines(manager.stop_grace)
        manager.listeners.append(self.stop_deadlines)
        for number in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(number, self._terminate)
        # Made once the server listens: the tasks a reload handed this image
        # are supervised from now on (taskman.adoption.run).
        adoption.serving()

    def _terminate(self) -> None:
        self.terminating = True

    def request(self) -> None:
        with self.guard as first:
            if not first or self.requested:
                log.warning("SIGHUP: a reload is already under way; ignored")
                return
            reload_timeline.start()
            log.info("SIGHUP: checking the installed %s before reloading", PROGRAM)
            # The whole session ahead, the check included, until the reload
            # is refused or the new image serves.
            self.autogroup_nice = boost_autogroup()
            try:
                self._check_and_pause()
            finally:
                if not self.requested:
                    restore_autogroup(self.autogroup_nice)

    def _check_and_pause(self) -> None:
        """The check, then the pumps paused; ``requested`` set and ``wake`` woken
        if the reload goes on."""
        try:
            program = installed_program()
        except ReloadRefused as error:
            return self._refuse(str(error))
        checking = time.monotonic()
        passed, text = check(program, self.options)
        reload_timeline.mark("checked")
        log.info("%s --check %s in %.2fs", PROGRAM, "passed" if passed else "failed",
                 time.monotonic() - checking)
        if not passed:
            failed = [line for line in text.splitlines() if "FAIL" in line] or \
                text.splitlines()[-1:] or ["no output"]
            return self._refuse(f"{program} --check failed: {'; '.join(failed)}")
        # Paused while still serving: if the output cannot be put down,
        # the server runs on as it was.
        if not self._pause():
            return self._refuse("task output still being written after "
                                f"{PAUSE_TIMEOUT:g}s")
        reload_timeline.mark("paused")
        if self.terminating:
            self._resume()
            return
        self.program, self.requested = program, True
        self.wake.set()

    def _pause(self) -> bool:
        if adoption.pause(adoption.running(self.manager.entries()), PAUSE_TIMEOUT):
            return True
        self._resume()
        return False

    def _resume(self) -> None:
        adoption.resume(adoption.running(self.manager.entries()))

    def _refuse(self, reason: str) -> None:
        log.error("reload refused, the server runs on unchanged: %s", reason)
        self.audit.record("server.reload_refused", pid=os.getpid(), reason=reason)

    def reexec(self, server, manager, port: int, state_dir: str) -> None:
        """Stop serving, hand the running tasks over and exec the new image.

        Returns only if the exec could not happen (the gRPC server is
        stopped by then: the caller shuts down as on SIGTERM); raises
        nothing.
        """
        log.info("reloading into %s: new calls refused for a moment, running tasks stay",
                 self.program)
        self.audit.record("server.reload", pid=os.getpid(), program=self.program)
        reload_timeline.mark("stopping")
        server.stop(grace=STOP_GRACE).wait(STOP_GRACE + 1)
        reload_timeline.mark("stopped")
        # No call runs now, so no task is spawned with the raised priority;
        # the new image goes back to ``nice`` before it serves.
        nice = boost_priority()
        uids = {task_id: uid for task_id, (uid, _) in manager.store.processes().items()}
        entries = adoption.running(manager.entries())
        # Again: tasks started before the server stopped have pumps too.
        if not adoption.pause(entries, PAUSE_TIMEOUT) or self.terminating:
            if not self.terminating:
                log.error("reload failed: task output still being written after %gs; "
                          "stopping as on SIGTERM", PAUSE_TIMEOUT)
            restore_priority(nice)
            restore_autogroup(self.autogroup_nice)
            adoption.resume(entries)
            return
        # From here to the exec nothing may yield: the pumps are paused, and
        # what the hand-over says must stay true.
        block_signal()
        try:
            state = adoption.capture(entries, port, self.stop_deadlines, uids)
            path = handover_format.write(state, state_dir)
            reload_timeline.mark("exec")
            reload_timeline.hand_over()
            exec_image(self.program, self.options, path, state.fds, nice, self.autogroup_nice)
        except (OSError, ReloadRefused) as error:
            reload_timeline.withdraw()
            restore_priority(nice)
            restore_autogroup(self.autogroup_nice)
            handover_format.remove(handover_format.path_in(state_dir))
            log.error("reload failed before the exec: %s; stopping as on SIGTERM",
                      getattr(error, "strerror", None) or error)
            self.audit.record("server.reload_refused", pid=os.getpid(), reason=str(error))
            adoption.resume(entries)
        unblock_signal()
