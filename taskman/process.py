"""Spawning, signalling and reaping task processes: the OS seam for tasks.

(``taskman.host`` holds the server's other dealings with the kernel.)

Why posix_spawn and a gate, not fork or ``preexec_fn``: with gRPC loaded,
``fork()`` runs gRPC's fork handlers and a few percent of children die before
exec (see docs/design.md); ``posix_spawn`` (vfork + exec) does not run them.
But posix_spawn has no hook between fork and exec, and a task must never run
outside its cgroups, not even for an instant. So the child is first the
compiled ``taskman-gate`` (``taskman.sandbox``): it writes itself into the
task's groups (``join``; or the server places it, ``place``), then blocks
reading a gate pipe until the server has registered the task and opens the
gate; only then does the gate confine itself (the task's uid, namespaces, no
capabilities) and exec the user's command. If the server's side fails, the
gate is killed before it ever runs the command; if the gate cannot join a
group, it exits 125 naming it, before the command ran.

Signals to the main process go through its pidfd: they reach it even if it
left its groups, and never a stranger that reused its pid.
"""

import errno
import fcntl
import itertools
import os
import signal
import stat
from typing import Callable, List, Optional, Sequence

import gevent
import gevent.event
from gevent.hub import get_hub

from taskman import host
from taskman.errors import CommandNotFound, InvalidArgument, NotExecutable, ResourceExhausted, TaskmanError
from taskman.output import Stream
from taskman.sandbox import UNCONFINED, Sandbox

# A task starts with every signal at its default action and none blocked:
# posix_spawn would otherwise pass on what the server ignores (SIGPIPE,
# SIGXFSZ), and an ignored SIGTERM would make every stop wait for the grace.
_DEFAULT_SIGNALS = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})

# Bigger pipes mean fewer wake-ups of the reader greenlet under fast writers.
PIPE_SIZE = 1 << 20
READ_CHUNK = 1 << 18

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _unwatched_posix_spawn():
    """os.posix_spawn as the standard library has it, not gevent's patch.

    gevent's adds a child watcher of its own to each child (``Process``
    has one already) and keeps every dead child's status for 60 s in a
    table that it scans whole at each child's exit: at 200 starts/s, 12,000
    entries read per task's end, on the loop."""
    try:
        from gevent.monkey import get_original
        return get_original("os", "posix_spawn")
    except (ImportError, AttributeError):
        return os.posix_spawn


_posix_spawn = _unwatched_posix_spawn()


def resolve(command: str, search_path: str = DEFAULT_PATH, sandbox: Sandbox = UNCONFINED) -> str:
    """Return the absolute path that ``command`` names, checked to be
    executable by ``sandbox``'s user (the task's, not the server's).

    Raises InvalidArgument (empty, NUL, relative path), CommandNotFound or
    NotExecutable. Checking here gives the caller a precise error; the check
    and the exec race, which only costs an exit code 126/127 from the gate.
    """
    validate_argument(command, "command")
    if not command:
        raise InvalidArgument("the command is empty")
    if "/" in command:
        if not command.startswith("/"):
            raise InvalidArgument(
                f"{command!r}: give an absolute path or a name found on the server's PATH")
        return _check_executable(command, sandbox)
    denied = None
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", command)
        try:
            return _check_executable(candidate, sandbox)
        except CommandNotFound:
            continue
        except NotExecutable as error:
            denied = denied or error  # keep looking, as execvp does
    if denied:
        raise denied
    raise CommandNotFound(f"{command}: command not found on the server's PATH")


def _check_executable(path: str, sandbox: Sandbox) -> str:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CommandNotFound(f"{path}: no such file") from None
    except NotADirectoryError:
        raise CommandNotFound(f"{path}: no such file") from None
    except PermissionError:
        raise NotExecutable(f"{path}: permission denied") from None
    except OSError as error:  # ENAMETOOLONG, ELOOP...: no file by that name can be run
        raise CommandNotFound(f"{path}: {os.strerror(error.errno)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise NotExecutable(f"{path}: is a directory")
    if not stat.S_ISREG(info.st_mode) or not os.access(path, os.X_OK):
        raise NotExecutable(f"{path}: not an executable file")
    sandbox.check_executable(path)
    return path


def validate_argument(value: str, what: str) -> None:
    """Raise InvalidArgument for what exec cannot pass: a NUL byte, a lone surrogate."""
    if "\0" in value:
        raise InvalidArgument(f"the {what} contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"the {what} is not valid UTF-8") from None


def seal_inherited_fds() -> int:
    """Mark every open descriptor above 2 close-on-exec; return how many changed.

    posix_spawn has no ``close_fds``. Python's own descriptors are already
    non-inheritable (PEP 446); this catches those the server inherited from
    whoever started it, so a task never sees them.
    """
    changed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
                changed += 1
        except OSError:
            pass  # the listing's own descriptor, already closed
    return changed


class OutputPipe:
    """The read end of one of a task's output pipes, and the stream it carries."""

    def __init__(self, stream: Stream, fd: int):
        self.stream = stream
        self.fd = fd
        self._readable = None
        # For a reload (taskman.adoption): the pump stops reading while
        # ``paused``, and ``holding`` says it has read bytes not yet appended.
        self.paused = False
        self.holding = False

    def read(self) -> bytes:
        """Wait for output; return up to READ_CHUNK bytes, or b"" at end of file."""
        while True:
            try:
                return os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                if self._readable is None:
                    self._readable = get_hub().loop.io(self.fd, 1)
                get_hub().wait(self._readable)

    def close(self) -> None:
        """Close the read end (any writer left gets EPIPE)."""
        if self._readable is not None:
            self._readable.close()
            self._readable = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Process:
    """A spawned task's main process: its pid, output pipes and exit watcher.

    ``outputs`` holds one pipe tagged COMBINED (stdout and stderr share it),
    or two tagged STDOUT and STDERR.
    """

    def __init__(self, pid: int, outputs: List[OutputPipe], child_watcher,
                 start_identity: Optional[str] = None):
        self.pid = pid
        self.outputs = outputs
        # Opened before the child can run anything (it waits at the gate), so
        # it names this process and no later owner of the pid. (An adopted
        # child is still ours, even as a zombie: the pid cannot be reused.)
        self.pidfd = host.open_pidfd(pid)
        # What tells this process apart from a later one with its pid, after
        # a restart of the server (taskman.recovery). None: read it now.
        self.start_identity = host.start_identity(pid) if start_identity is None else start_identity
        self.wait_status: Optional[int] = None
        self._exited = gevent.event.Event()
        self._child_watcher = child_watcher
        child_watcher.start(self._on_exit)

    def _on_exit(self) -> None:
        self.wait_status = self._child_watcher.rstatus
        self._child_watcher.stop()
        self._exited.set()

    def deliver(self, wait_status: int) -> None:
        """Record an exit status reaped elsewhere (an adopted child that
        exited during the reload's exec)."""
        if self.wait_status is None:
            self.wait_status = wait_status
            self._child_watcher.stop()
            self._exited.set()

    def reaped_status(self) -> Optional[int]:
        """The exit status, also when libev reaped the child but has not yet
        run the callback (a reload hands it over: nothing else will)."""
        if self.wait_status is None and self._child_watcher.rpid == self.pid:
            return self._child_watcher.rstatus
        return self.wait_status

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block this greenlet until the process exits; return its wait status.

        None if ``timeout`` passed first.
        """
        self._exited.wait(timeout)
        return self.wait_status

    @property
    def exited(self) -> bool:
        return self.wait_status is not None

    def signal(self, number: int) -> bool:
        """Send a signal to the main process, through its pidfd, wherever its
        groups are; False if it is already gone."""
        if self.exited:
            return False  # reaped: the pid may belong to someone else by now
        if self.pidfd >= 0:
            return host.pidfd_send(self.pidfd, number)
        return send(self.pid, number)

    def close_output(self) -> None:
        """Close the read end of every output pipe, and the pidfd."""
        for pipe in self.outputs:
            pipe.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn(executable: str, args: list, env: dict, cwd: str = "/",
          place: Optional[Callable[[int], None]] = None,
          separate_streams: bool = False, sandbox: Sandbox = UNCONFINED,
          join: Sequence[str] = ()) -> Process:
    """Start ``executable args...`` with stdout and stderr on one new pipe,
    confined by ``sandbox`` (its uid, namespaces; see taskman.sandbox).

    With ``separate_streams``, stdout and stderr get a pipe each: a reader
    can tell them apart but no longer knows their exact interleaving.
    ``join``: the cgroup.procs files the child writes itself into before
    anything else (the task's groups). ``place(pid)`` runs after the child
    exists and before it can run the command (it registers the task; given
    no ``join``, it writes the pid into the task's groups). If it raises,
    the child is killed and reaped and the exception propagates. The child
    may still be joining its groups when this returns.
    The child gets stdin from /dev/null, its own session and process group,
    default signal actions and only descriptors 0, 1 and 2.
    """
    streams = (Stream.STDOUT, Stream.STDERR) if separate_streams else (Stream.COMBINED,)
    pipes = []
    try:
        for _ in streams:
            pipes.append(os.pipe2(os.O_CLOEXEC))
        gate_read, gate_write = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        for fd in itertools.chain.from_iterable(pipes):
            os.close(fd)
        raise
    readers = [read_end for read_end, _ in pipes]
    for read_end in readers:
        try:
            fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size for an unprivileged server
    # posix_spawn's dup2(fd, fd) would keep close-on-exec set: keep our ends
    # above the descriptors the child receives.
    writers = [_above(write_end, 3) for _, write_end in pipes]
    gate_read = _above(gate_read, 3)
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, writers[0], 1),
        (os.POSIX_SPAWN_DUP2, writers[-1], 2),  # the same pipe unless separate
        (os.POSIX_SPAWN_DUP2, gate_read, 3),
    ]
    argv = sandbox.gate_argv(cwd, executable, args, join)
    try:
        environment = sandbox.environment(env)
        before = host.boot_clock()
        pid = _posix_spawn(argv[0], argv, environment, file_actions=file_actions, setsid=True,
                           setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    except BaseException:
        for fd in (*readers, *writers, gate_read, gate_write):
            os.close(fd)
        raise
    identity = host.spawned_identity(before, host.boot_clock())
    # Watch before anything can yield to the loop: libev reaps every child on
    # SIGCHLD and drops the status of a pid nobody watches.
    outputs = [OutputPipe(stream, read_end) for stream, read_end in zip(streams, readers, strict=True)]
    process = Process(pid, outputs, get_hub().loop.child(pid, False), start_identity=identity)
    for fd in (*writers, gate_read):
        os.close(fd)
    try:
        if place is not None:
            place(pid)
        if not process.start_identity:
            # Rarely (see host.spawned_identity); read as late as it can be,
            # the gate more likely done with its exec.
            process.start_identity = host.start_identity(pid)
        os.write(gate_write, b"\n")
    except BaseException:
        process.signal(signal.SIGKILL)
        os.close(gate_write)
        process.wait()
        process.close_output()
        raise
    os.close(gate_write)
    for read_end in readers:
        os.set_blocking(read_end, False)
    return process


def adopt(pid: int, pipes: List[tuple], start_identity: str) -> Process:
    """A child this process's earlier image spawned (a reload): its
    watcher started at once, its pipes ``(stream, fd)`` as they were left.

    Never yields (taskman.reload.adopt_children relies on it)."""
    outputs = [OutputPipe(Stream(stream), fd) for stream, fd in pipes]
    return Process(pid, outputs, get_hub().loop.child(pid, False), start_identity or None)


def spawn_error(error: OSError) -> TaskmanError:
    """The library's error for an OSError raised while spawning a task.

    E2BIG is the request's fault (InvalidArgument); a full process or file
    table is the server's limit (ResourceExhausted, may work later).
    """
    if error.errno == errno.E2BIG:
        return InvalidArgument("the command line is too long for exec (E2BIG)")
    if error.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
        return ResourceExhausted(f"cannot start the task now: {os.strerror(error.errno)}")
    return TaskmanError(f"cannot start the task: {os.strerror(error.errno)}")


def _above(fd: int, lowest: int) -> int:
    if fd > lowest:
        return fd
    duplicate = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest + 1)
    os.close(fd)
    return duplicate


def send(pid: int, number: int) -> bool:
    """kill(2) that treats an exited process as success-by-absence (False)."""
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        return False
    except OSError as error:
        if error.errno == errno.ESRCH:
            return False
        raise
    return True
