"""The manager's side of a reload: its running tasks into a hand-over, and back.

The old image pauses every pump (``pause``: the bytes a task writes from
then on wait in its pipe), waits until none holds bytes it read but did not
append, and describes each running task (``capture``: no yield from there
to the exec, so nothing moves meanwhile). The new image adopts the pids
first thing (``adopt_processes``, before anything can yield: see
taskman.reload.adopt_children), then the manager rebuilds each task from
the hand-over: its record, its output log reopened at its size, its
cgroups, its stop (``resume_stop``: a stop keeps its source and deadline).
"""

import collections
import datetime
import fcntl
import logging
import os
import signal
import struct
import termios
import time
from typing import Callable, Dict, Iterable, List, Optional

import gevent
import gevent.event

from taskman import handover, process, reload, reload_timeline
from taskman.cgroups import Driver, Group
from taskman.cgroups.hierarchy import CgroupGroup
from taskman.output import OutputLog, reopen_log
from taskman.task import Source, Task

log = logging.getLogger("taskman.reload")

PAUSE_TIMEOUT = 5.0  # seconds for the pumps to put down what they read


def running(entries: Iterable) -> List:
    """The manager's entries of tasks not yet ended, with their process."""
    return [entry for entry in entries
            if not entry.ended.is_set() and entry.process is not None]


def _pipes(entries: Iterable):
    return [pipe for entry in entries for pipe in entry.process.outputs if pipe.fd >= 0]


def pause(entries: List, timeout: float = PAUSE_TIMEOUT) -> bool:
    """Stop the pumps of ``entries`` reading; True once none holds bytes it
    read and did not append (the caller must then not yield until the exec)."""
    pipes = _pipes(entries)
    for pipe in pipes:
        pipe.paused = True
    deadline = time.monotonic() + timeout
    while any(pipe.holding for pipe in pipes):
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.001)
    return True


def resume(entries: List) -> None:
    """Let the pumps read again (the reload did not happen)."""
    for pipe in _pipes(entries):
        pipe.paused = False


def capture(entries: List, port: int, deadlines: Dict[str, float],
            uids: Dict[str, int]) -> handover.Handover:
    """The hand-over of ``entries`` (paused); never yields. ``deadlines``:
    task id -> when its stop's SIGKILL is due (taskman.reload.StopDeadlines)."""
    return handover.Handover(pid=os.getpid(), port=port,
                             tasks=[_state(entry, deadlines.get(entry.task.id),
                                           uids.get(entry.task.id, -1)) for entry in entries])


def _state(entry, deadline: Optional[float], uid: int) -> handover.TaskState:
    task, proc, output, group = entry.task, entry.process, entry.log, entry.group
    kill_at = None
    if entry.sent_signal == signal.SIGTERM:
        kill_at = getattr(entry, "kill_at", None) or deadline or time.monotonic()
    return handover.TaskState(
        id=task.id, owner=task.owner, command=task.command, args=list(task.args), pid=proc.pid,
        start_time=task.start_time.isoformat(), start_identity=proc.start_identity, uid=uid,
        pipes=[handover.Pipe(int(pipe.stream), pipe.fd) for pipe in proc.outputs if pipe.fd >= 0],
        output_size=output.size, output_dropped=output.dropped, output_capped=output.capped,
        output_error=output.write_error or "", index_records=output.index_records,
        group_directories=dict(getattr(group, "directories", {}) or {}),
        slice_name=getattr(group, "slice_name", None),
        stop_source=entry.stop_source.value if entry.stop_source else "",
        sent_signal=int(entry.sent_signal), kill_at=kill_at,
        wait_status=proc.reaped_status())


def adopt_processes(state: handover.Handover) -> Dict[str, process.Process]:
    """Every handed-over task's Process, exit statuses of the exec's time
    delivered. Call before anything yields to the gevent loop."""
    by_pid = {}

    def adopt(pid: int) -> None:
        task = tasks[pid]
        by_pid[pid] = process.adopt(pid, [(pipe.stream, pipe.fd) for pipe in task.pipes],
                                    task.start_identity)

    tasks = {task.pid: task for task in state.tasks}
    exited = reload.adopt_children(tasks, adopt)
    for pid, status in exited.items():
        known = tasks[pid].wait_status
        if status is not None or known is not None:
            by_pid[pid].deliver(status if status is not None else known)
        else:  # not our child any more: its status is lost
            log.error("task %s: adopted pid %d is not a child of this process", tasks[pid].id,
                      pid)
            by_pid[pid].deliver(signal.SIGKILL)
    for pid, task in tasks.items():
        if task.wait_status is not None:
            by_pid[pid].deliver(task.wait_status)
    reload.close_inherited(state.fds)
    return {tasks[pid].id: proc for pid, proc in by_pid.items()}


def task_of(state: handover.TaskState) -> Task:
    return Task(id=state.id, owner=state.owner, command=state.command, args=list(state.args),
                pid=state.pid, start_time=datetime.datetime.fromisoformat(state.start_time))


def log_of(state: handover.TaskState, output_dir: str, max_bytes: int) -> OutputLog:
    """The task's output log, live again at the size the old image left."""
    output = reopen_log(output_dir, state.id)
    if output.size != state.output_size:
        log.warning("task %s: output log holds %d bytes, the hand-over said %d", state.id,
                    output.size, state.output_size)
    output.dropped, output.capped = state.output_dropped, state.output_capped
    output.write_error = state.output_error or None
    output.resume_writing(max_bytes)
    return output


def group_of(state: handover.TaskState) -> Group:
    """The task's groups as the old image made them."""
    if state.group_directories:
        group = CgroupGroup(state.id, dict(state.group_directories), state.slice_name)
    else:
        group = Group(state.id)
    group.pid = state.pid
    return group


def restore_stop(entry, state: handover.TaskState) -> None:
    """Put back who asked for the stop and which signal went out."""
    entry.stop_source = Source(state.stop_source) if state.stop_source else None
    entry.sent_signal = state.sent_signal
    entry.kill_at = state.kill_at


def resume_stop(entry, terminate, kill) -> None:
    """Go on with a stop the old image began: SIGKILL at its deadline (at
    once if past), or the whole stop again (``terminate(entry)``) if no
    signal went out yet. ``kill(entry)`` SIGKILLs the task."""
    if entry.sent_signal == 0:
        terminate(entry)
        return
    if entry.sent_signal == signal.SIGTERM and entry.kill_at is not None:
        remaining = entry.kill_at - time.monotonic()
        if remaining > 0 and entry.process.wait(remaining) is not None:
            return  # ended within its grace: the supervisor records it
    entry.sent_signal = signal.SIGKILL
    kill(entry)


def spared(adopted) -> frozenset:
    """The ids of the tasks ``adopted`` (hand-over, processes) names."""
    return frozenset(task.id for task in adopted[0].tasks) if adopted else frozenset()


def setup_driver(driver: Driver, spared: frozenset) -> None:
    """``driver.setup()``, sparing the adopted tasks' groups from its clean-up."""
    driver.setup(spare=spared)


def entries(adopted, make_entry, output_dir: str, max_bytes: int) -> List:
    """The manager's entries (``make_entry(task, log, group, process)``) for
    the tasks ``adopted`` (hand-over, processes) names, their stops as the
    old image left them; [] for None."""
    if not adopted:
        return []
    state, processes = adopted
    made = []
    for handed in state.tasks:
        entry = make_entry(task_of(handed), log_of(handed, output_dir, max_bytes),
                           group_of(handed), processes[handed.id])
        restore_stop(entry, handed)
        made.append(entry)
    log.info("adopted %d running task(s) from the previous image", len(made))
    return made


def run(entry, supervise, terminate, kill) -> None:
    """Supervise an adopted task again, and go on with its stop if one began.

    The supervision (a greenlet and its output pump per task) starts once
    the new image listens (``serving``), a batch at a time when the loop
    is idle (``_Resumption``): starting 1,000 of them takes ~0.2 s of one
    core, which the start-up's first yields (grpc's start, the TLS
    self-test) would otherwise spend before the server listens. Waiting is
    safe: every adopted pid is watched already (``adopt_processes``), so an
    exit waits in its watcher, and output waits in its pipe.
    """
    _RESUMPTION.add(lambda: gevent.spawn(supervise, entry), lambda: waiting_bytes(entry))
    if entry.stop_source is not None:
        gevent.spawn(resume_stop, entry, terminate, kill)


def waiting_bytes(entry) -> int:
    """Bytes the task wrote that wait in its pipes (FIONREAD)."""
    total = 0
    for pipe in entry.process.outputs if entry.process is not None else ():
        if pipe.fd >= 0:
            try:
                total += struct.unpack("i", fcntl.ioctl(pipe.fd, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                pass
    return total


def serving() -> None:
    """The new image listens: supervise the adopted tasks now."""
    _RESUMPTION.listening.set()
    if _RESUMPTION.greenlet is None:  # none to supervise
        _RESUMPTION.restore_autogroup()


RESUME_BATCH = 10  # adopted tasks whose supervision starts per idle turn of the loop
RESUME_WAIT = 0.01  # seconds a batch waits for an idle loop at most (a busy one never is)
# Seconds the supervision waits for ``serving`` at most: a start-up that
# fails before it listens still records its tasks' ends.
LISTEN_WAIT = 2.0


class _Resumption:
    """Runs the queued starts once ``listening`` is set (or after
    ``LISTEN_WAIT``), ``RESUME_BATCH`` at a time, each batch once the loop
    has nothing else to do (or after ``RESUME_WAIT``), so the first calls
    go between batches. Tasks whose pipes hold the most output go first:
    their followers wait for those bytes, and with 1,000 tasks the last
    batch starts 0.1-0.4 s after the server listens."""

    def __init__(self):
        self.waiting = collections.deque()
        self.greenlet = None
        self.listening = gevent.event.Event()
        # The reload's boost of the session (taskman.reload.boost_autogroup)
        # lasts until every adopted task is supervised again: the first calls
        # and the followers' catching up come meanwhile. Tasks are sessions
        # of their own, so none is spawned with it.
        self.autogroup_nice = None

    def restore_autogroup(self) -> None:
        nice, self.autogroup_nice = self.autogroup_nice, None
        reload.restore_autogroup(nice)

    def add(self, start: Callable[[], object], waiting: Callable[[], int] = lambda: 0) -> None:
        """``waiting``: how many bytes the task's output holds back, asked once listening."""
        self.waiting.append((start, waiting))
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        started = 0
        try:
            self.listening.wait(LISTEN_WAIT)
            self.waiting = collections.deque(sorted(self.waiting, key=lambda queued: -queued[1]()))
            while self.waiting:
                with gevent.Timeout(RESUME_WAIT, False):
                    gevent.idle()
                for _ in range(min(RESUME_BATCH, len(self.waiting))):
                    self.waiting.popleft()[0]()
                    started += 1
            since = reload_timeline.since_sighup()
            if since is not None:
                log.info("reload: the %d adopted task(s) supervised again %.3fs after SIGHUP",
                         started, since)
        finally:
            self.greenlet = None
            self.restore_autogroup()


_RESUMPTION = _Resumption()


def adopt(path: str):
    """The new image's first act: ``(hand-over, {task id: Process})`` from
    the hand-over at ``path``, or None if it cannot be used (one ERROR line;
    its tasks are then ended by crash recovery, as after a crash)."""
    # Back to the old image's priority at the loop's first turn: the imports
    # and start-up before it keep the reload's boost; nothing is spawned
    # before it (taskman.reload.restore_priority).
    gevent.spawn(reload.restore_priority, reload.take_nice())
    _RESUMPTION.autogroup_nice = reload.take_autogroup_nice()
    try:
        state = handover.read(path)
    except handover.HandoverError as error:
        log.error("%s; the tasks it names are ended as after a crash", error)
        handover.remove(path)
        return None
    processes = adopt_processes(state)
    handover.remove(path)
    return state, processes


def last_resort(adopted, state_dir: str) -> int:
    """This image was handed tasks but cannot serve: end them (source
    ``server``) so none is left running unsupervised; return how many."""
    from taskman.store import TaskStore  # only on this path

    state, _ = adopted
    store = TaskStore(os.path.join(state_dir, "tasks.db"))
    try:
        records = {task.id: task for task in store.load_running()}

        def record(task_id: str, wait_status: int) -> None:
            task = records.get(task_id)
            if task is not None and task.running:
                task.finish(wait_status, Source.SERVER, signal.SIGKILL)
                store.save(task)

        ended = reload.end_abandoned(state, record)
    finally:
        store.close()
    log.error("the new image could not start: ended the %d task(s) it was handed "
              "(SIGKILL, source server)", ended)
    return ended
