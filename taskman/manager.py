"""TaskManager: start, stop, inspect and follow tasks on behalf of users.

The library's API. It knows users only as names (the servicer takes them from
client certificates) and raises ``taskman.errors``; it knows nothing of gRPC.
Everything runs as greenlets in one gevent hub: per task, a pump (``pump``)
copies the output pipes into the task's OutputLog and a supervisor waits for
the exit, ends what the task left behind and records the outcome.

This module owns the API and that supervision (start, stop, the end of a
task, access). It leans on neighbours for the rest: ``process`` (spawn,
reap) and ``host`` (the server's own OS calls), ``output`` (the logs and
their files), ``store`` (records), ``history`` (finished tasks: on disk
only, never in memory), ``listing``, ``retention`` and ``recovery``.
"""

import datetime
import itertools
import logging
import os
import signal
from typing import Dict, Iterable, Iterator, Optional, Union

import gevent
import gevent.event

from taskman import adoption, confinement, host, listing, output_quota, process, pump, recovery, retention, stopping
from taskman.cgroups import Driver, Group
from taskman.cgroups.none import ProcessGroupDriver
from taskman.cgroups.slices import Owner
from taskman.defaults import default_state_dir
from taskman.errors import InvalidArgument, NotFound, Unavailable
from taskman.history import History
from taskman.holdings import argument_bytes
from taskman.output import Chunk, OutputLog, Selector, create_log, data_only, ensure_directory
from taskman.store import TaskStore
from taskman.task import JobStatus, Source, Task, command_line, is_task_id, now, parse_task_id
from taskman.task_groups import GROUP_EMPTY_TIMEOUT, TaskGroups

log = logging.getLogger("taskman.manager")

ADMIN = "admin"

# After the main process exits and its group is killed, the pipe reaches end
# of file within milliseconds. A process that escaped the group (only possible
# with the ``none`` driver) could hold it open forever: stop waiting then.
EOF_TIMEOUT = 5.0
# A stop request returns after this long even if the task is still in its
# grace period: well inside clients' deadlines (the CLI's is 60 s).
STOP_WAIT_MAX = 30.0


class _Entry:
    """A task and what the manager needs to run it."""

    def __init__(self, task: Task, log: OutputLog, group: Optional[Group] = None,
                 proc: Optional[process.Process] = None):
        self.task = task
        self.log = log
        self.group = group
        self.process = proc
        self.stop_source: Optional[Source] = None
        self.sent_signal = 0
        self.ended = gevent.event.Event()  # outcome recorded, tree gone
        if proc is None:
            self.ended.set()


class TaskManager:
    """Runs tasks and answers for them; see the module docstring.

    ``stop_grace``: seconds between SIGTERM and SIGKILL on stop (0 sends
    SIGKILL at once, as the RFD's exercise did). ``admins``: users who may
    act on every task. ``output_max_bytes``: per-task output cap (0: none).
    Finished tasks are forgotten (record and output) after ``retention_age``
    seconds, and oldest first while their output exceeds ``retention_bytes``
    (0 disables either). ``users`` (a taskman.users.Users) runs each user's
    tasks as its own unprivileged uid in the sandbox; None runs them as the
    server's own user, unconfined (library use). ``warm_groups``: task
    groups kept ready per recent user (taskman.task_groups); none unless
    asked: a ready group is named like a task's, so a listing of the
    hierarchy (an operator's, a test's) shows groups of no task. ``quotas`` (a
    taskman.quotas.Quotas): each user's quotas on starts, output and finished
    records; None: no per-user quotas (library use).
    """

    def __init__(self, state_dir: Optional[str] = None, driver: Optional[Driver] = None,
                 stop_grace: float = 10.0, admins: Iterable[str] = (ADMIN,),
                 search_path: str = process.DEFAULT_PATH, output_max_bytes: int = 0,
                 retention_age: float = retention.DEFAULT_AGE,
                 retention_bytes: int = retention.DEFAULT_BUDGET, users=None, quotas=None, adopted=None,
                 warm_groups: int = 0):
        self.state_dir = ensure_directory(state_dir or default_state_dir())
        self.output_dir = ensure_directory(os.path.join(self.state_dir, "output"))
        self.driver = driver or ProcessGroupDriver()
        self.stop_grace = stop_grace
        self.admins = frozenset(admins)
        self.search_path = search_path
        self.output_max_bytes = output_max_bytes
        self.retention_age = retention_age
        self.retention_bytes = retention_bytes
        self.quotas = quotas
        self._tasks: Dict[str, _Entry] = {}  # running tasks (and ended ones whose record failed to save)
        self._closing = False
        # (event, task) callables told of started/stopping/ended/escaped (audit, metrics).
        self.listeners: list = []
        process.seal_inherited_fds()
        host.become_subreaper()
        self.store = TaskStore(os.path.join(self.state_dir, "tasks.db"))
        self.confinement = confinement.Confinement(users, self.store)
        self.entries = self._tasks.values  # what a reload hands over (taskman.adoption)
        self.entry = self._tasks.get  # a running task's entry by id (taskman.holdings)
        spared = adoption.spared(adopted)  # a reload's tasks: adopted, not recovered nor removed
        self._recover(spared)  # before setup(): it looks for the earlier life's processes
        self.history = History(self.store, self.output_dir)  # after: it counts the recovered
        adoption.setup_driver(self.driver, spared)
        self.groups = TaskGroups(self.driver, warm_groups)
        for entry in adoption.entries(adopted, _Entry, self.output_dir, self.output_max_bytes):
            self._tasks[entry.task.id] = entry
            adoption.run(entry, self._supervise, self._terminate, self._kill)
        self.prune()
        self._pruner = gevent.spawn(retention.sweep_periodically, self.prune, self.retention_age)
        if quotas is not None and quotas.limits.output_bytes:
            gevent.spawn(output_quota.sweep_periodically,
                         lambda: itertools.chain(self._tasks.values(), self.history.quota_entries()),
                         quotas, lambda: self._closing)

    # -- the API

    def start(self, owner: str, command: str, args: Iterable[str] = (),
              separate_streams: bool = False, task_id: Optional[str] = None) -> Task:
        """Start ``command args...`` for ``owner``; return the new task.

        ``separate_streams``: a pipe each for stdout and stderr (readers tell
        them apart, but lose their exact interleaving). ``task_id``: chosen
        elsewhere (a fleet record's), so the task has one id everywhere.
        Raises InvalidArgument (and its CommandNotFound, NotExecutable; a
        taken or malformed ``task_id``), ResourceExhausted (disk, process
        table), CgroupError, Unavailable.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        if not owner:
            raise InvalidArgument("no user given")
        args = list(args)
        sandbox = self.confinement.sandbox_for(owner)
        executable = process.resolve(command, self.search_path, sandbox)
        for argument in args:
            process.validate_argument(argument, "argument")
        size = argument_bytes(command, args)
        if self.quotas is not None:
            self.quotas.check_start(owner, size)
        if task_id is not None and (not is_task_id(task_id) or task_id in self._tasks
                                    or self.store.position(task_id)):
            raise InvalidArgument(f"task id {task_id!r} is malformed or taken")
        # Each user's slice: by uid if confined; by name if not (all
        # unconfined users share one uid, but not one slice). A ready
        # group comes with the id of its task; a new one is made in the
        # groups' worker while the output file is made here.
        making = self.groups.create(Owner(owner, sandbox.uid if sandbox.confined else None), task_id)
        task_id = making.task_id
        output = None
        try:
            output = create_log(self.output_dir, task_id, self.output_max_bytes)
            group = making.get()
            proc = process.spawn(executable, args, confinement.environment(task_id, owner, self.search_path),
                                 place=lambda pid: self._place(group, pid, owner, size),
                                 separate_streams=separate_streams, sandbox=sandbox,
                                 join=self.groups.joining(group))
        except BaseException as error:
            if output is not None:
                output.remove()
            self.groups.abandon(making)
            if isinstance(error, OSError):
                raise process.spawn_error(error) from None
            raise
        task = Task(id=task_id, owner=owner, command=command, args=args, pid=proc.pid,
                    start_time=now())
        entry = _Entry(task, output, group, proc)
        self._tasks[task_id] = entry
        self._store_call(self.store.save_started, task, confinement.uid_of(sandbox),
                         proc.start_identity)
        gevent.spawn(self._supervise, entry)
        self._notify("started", task.snapshot())
        log.info("task %s started for %s: pid %d, uid %d, %s", task_id, owner, proc.pid,
                 confinement.uid_of(sandbox), command_line(command, args))
        return task.snapshot()

    def stop(self, requester: str, task_id: str, wait: Optional[float] = None) -> Task:
        """Stop a running task (all its processes); a finished one is left as is.

        Sends SIGTERM, then SIGKILL after ``stop_grace``. Waits up to ``wait``
        seconds (default: the grace plus a margin, at most STOP_WAIT_MAX) for
        the task to end, so the returned status is final unless the grace is
        long; the stop goes on regardless.
        """
        entry = self._lookup(requester, task_id)
        if isinstance(entry, Task):
            return entry  # finished
        self._request_stop(entry, Source.USER)
        if wait is None:
            wait = min(self.stop_grace + EOF_TIMEOUT, STOP_WAIT_MAX)
        entry.ended.wait(wait)
        return self._snapshot(entry)

    def status(self, requester: str, task_id: str) -> Task:
        """Return a snapshot of the task; NotFound if missing or not the requester's."""
        found = self._lookup(requester, task_id)
        return found if isinstance(found, Task) else self._snapshot(found)

    def stream(self, requester: str, task_id: str,
               cancelled: Optional[gevent.event.Event] = None, **view) -> Iterator[bytes]:
        """``chunks`` without the labels: the output bytes alone (the RFD's stream)."""
        return data_only(self.chunks(requester, task_id, cancelled, **view))

    def chunks(self, requester: str, task_id: str,
               cancelled: Optional[gevent.event.Event] = None, offset: int = 0,
               selector: Selector = Selector.ALL, tail_bytes: int = 0, tail_lines: int = 0,
               since: Optional[datetime.datetime] = None, follow: bool = True) -> Iterator[Chunk]:
        """The task's output as Chunks (see OutputLog.chunks for the view and
        when it ends). Checks access now (NotFound), not on first iteration."""
        found = self._lookup(requester, task_id)
        output = self.history.log(found) if isinstance(found, Task) else found.log
        return output.chunks(offset, Selector(selector), tail_bytes, tail_lines, since,
                                follow, cancelled)

    def tasks(self, requester: str, owner: Optional[str] = None,
              statuses: Iterable[JobStatus] = (), limit: int = 0,
              after: Optional[str] = None) -> list:
        """Snapshots of the tasks ``requester`` may see, newest first.

        An admin sees everyone's (``owner`` narrows them); anyone else only
        their own, whatever ``owner`` says. ``statuses`` filters (empty: all);
        ``limit`` caps the count (0: all); ``after`` continues a listing after
        that task (InvalidArgument if it is gone, e.g. removed by retention).
        """
        if requester not in self.admins:
            owner = requester
        return list(listing.select(self.store, owner, statuses, limit, after, self._live))

    def prune(self) -> int:
        """Forget finished tasks past the retention age, the disk budget or
        their user's finished-records quota.

        Oldest first (see ``taskman.retention``). Returns how many were
        removed; they are NOT_FOUND after.
        """
        forgotten = self.history.prune(self.retention_age, self.retention_bytes,
                                       self.quotas.records_to_forget if self.quotas else None)
        if forgotten:
            log.info("retention: forgot %d finished task(s)", forgotten)
        return forgotten

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Refuse new tasks, end the running ones (source ``server``), wait for them.

        Tasks get the stop grace (``timeout``, by default the grace plus a
        margin) to end; whatever is still running then, such as a task in the
        long grace of a user's stop, is SIGKILLed: no task outlives the server.
        """
        self._closing = True
        running = [entry for entry in self._tasks.values() if not entry.ended.is_set()]
        for entry in running:
            self._request_stop(entry, Source.SERVER)
        if timeout is None:
            timeout = self.stop_grace + EOF_TIMEOUT
        gevent.wait([entry.ended for entry in running], timeout=timeout)
        for entry in running:
            if not entry.ended.is_set():
                entry.sent_signal = signal.SIGKILL
                self._kill(entry)
        gevent.wait([entry.ended for entry in running],
                    timeout=GROUP_EMPTY_TIMEOUT + EOF_TIMEOUT)
        self._pruner.kill()
        self.groups.close()
        self.driver.close()  # the store stays open: calls still in flight read finished tasks

    # -- running a task

    def _supervise(self, entry: _Entry) -> None:
        """Wait for the main process, end what it left, record the outcome."""
        proc, task = entry.process, entry.task
        pump_greenlet = gevent.spawn(pump.pump, proc, entry.log)
        try:
            wait_status = proc.wait()
            exited_at = now()
            # The task is its whole tree: what the main process left behind
            # dies with it, which also releases the output pipe they hold.
            self.groups.kill(entry.group)
            source = stopping.ended_by(entry, wait_status)
            if (source is Source.NONE and os.WIFSIGNALED(wait_status)
                    and os.WTERMSIG(wait_status) == signal.SIGKILL
                    and self._safely(self.driver.oom_killed, entry.group)):
                source = Source.OOM
            pump_greenlet.join(timeout=EOF_TIMEOUT)
            if not pump_greenlet.dead:
                log.warning("task %s: output still open after the group was killed; "
                            "closing it", task.id)
                pump_greenlet.kill()
            # Its groups go before "ended" is published (the removal yields to
            # the groups' thread): an ended task has no group left behind.
            self.groups.discard(entry.group, emptied=True)
            entry.group = None
            # Published only now, so "ended" always comes with complete output.
            task.finish(wait_status, source, entry.sent_signal, exited_at)
            log.info("task %s ended: %s exit %s %s %s", task.id, task.status.name,
                     task.exit_code, task.signal or "-", task.source.value or "-")
        finally:
            proc.close_output()
            entry.log.finish()
            if entry.group is not None:  # the wait above failed
                self.groups.discard(entry.group)
            entry.process = entry.group = None
            record = self._snapshot(entry)  # from now on on disk only, unless the save fails
            if self._store_call(self.store.save, record):
                del self._tasks[task.id]
                self.history.add(record, entry.log)
            entry.ended.set()
            self._notify("ended", entry.task.snapshot())
            if self.retention_bytes and self.history.total_bytes > self.retention_bytes:
                self._store_call(self.prune)

    def _request_stop(self, entry: _Entry, source: Source) -> None:
        if entry.ended.is_set() or entry.stop_source is not None:
            return
        entry.stop_source = source
        gevent.spawn(self._terminate, entry)
        notice = entry.task.snapshot()
        notice.source = source
        self._notify("stopping", notice)

    def _terminate(self, entry: _Entry) -> None:
        stopping.terminate(entry, self.driver, self.stop_grace, self._notify, self._safely)

    def _kill(self, entry: _Entry) -> None:
        stopping.kill(entry, self.driver, self._safely)

    def _place(self, group: Group, pid: int, owner: str, size: int) -> None:
        # Making the group in the worker yields to the loop: the server may
        # have begun to stop, or the user's other starts filled the quota.
        # Checked again here, after the last yield before the task is
        # registered; a raise kills the gate before it opens.
        self.groups.place(group, pid)
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self.quotas is not None:
            self.quotas.check_start(owner, size)

    def _safely(self, method, group: Group, *args, default=False):
        return self.groups.safely(method, group, *args, default=default)

    # -- records

    def _snapshot(self, entry: _Entry) -> Task:
        task = entry.task.snapshot()
        task.output_size = entry.log.size
        task.output_dropped = entry.log.dropped
        task.output_note = entry.log.note
        return task

    def _notify(self, event: str, task: Task) -> None:
        for listener in self.listeners:
            try:
                listener(event, task)
            except Exception:  # noqa: BLE001 - an observer must not break a task
                log.exception("listener %r failed on %s", listener, event)

    def _store_call(self, method, *args) -> bool:
        # A failing disk must not fail a start or lose an outcome in memory.
        try:
            method(*args)
            return True
        except Exception as error:  # noqa: BLE001 - sqlite3 raises many kinds
            log.error("task store: %s failed: %s", method.__name__, error)
            return False

    def _recover(self, adopted: frozenset = frozenset()) -> None:
        """End the tasks an earlier life left running; finished records stay on disk."""
        started = {task_id: identity for task_id, (_, identity) in self.store.processes().items()}
        ended = recovery.recover(self.store.load_running(adopted), self.output_dir,
                                 lambda task: self._store_call(self.store.save, task), started, adopted)
        if ended:
            log.info("recovered %d task(s) left running in %s", ended, self.store.path)

    # -- helpers

    def _lookup(self, requester: str, task_id: str) -> Union[_Entry, Task]:
        """The running task's entry, or the finished task's record."""
        task_id = parse_task_id(task_id)
        found = self._tasks.get(task_id) or self.history.record(task_id)
        owner = found.owner if isinstance(found, Task) else found and found.task.owner
        if found is None or (requester not in self.admins and owner != requester):
            # "Not yours" reads as "not there": others' ids stay undiscoverable.
            raise NotFound(f"task {task_id} not found")
        return found

    def _live(self, task: Task) -> Task:
        """``task`` (a record) as it is now: a running task's from memory."""
        entry = self._tasks.get(task.id)
        return self._snapshot(entry) if entry is not None else task
