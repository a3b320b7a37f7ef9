"""What a task may touch: the policy a task runs under, and the gate's command line.

Every task starts as ``taskman-gate`` (compiled from taskman/gate/ at
install), not as a shell: posix_spawn has no hook between fork and exec, and
the server must not fork under gRPC, so the gate does in the child what must
happen before the task's code runs. It writes itself into the task's cgroups
(the first write to a cgroup.procs after a quiet spell waits for an RCU grace
period, milliseconds the server's event loop and its reply need not wait
for: docs/design.md; a failure ends the task
with exit 125 and the group named on its output), waits until the server has
registered the task (descriptor 3), then, for a confined task, enters a private
mount and IPC namespace with a fresh tmpfs on each world-writable directory
(/tmp, /var/tmp, /dev/shm, /run/lock) and a /proc that hides other users'
processes, drops every capability (bounding set included), sets
no_new_privs, clears supplementary groups, becomes the task's uid and gid,
sets umask 077 and no core dumps, and only then changes to the
working directory and execs the command. Doing the same with util-linux's
unshare, mount and setpriv costs one exec each: several milliseconds per start
where the gate costs a fraction of one (docs/design.md).

The gate exits 125 with one line on the task's output when it fails itself,
126 or 127 when the exec fails, as a shell would.
"""

import os
import stat
from dataclasses import dataclass
from typing import Optional, Sequence

from taskman.errors import CommandNotFound, ConfigError, NotExecutable

GATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate", "taskman-gate")

# Per mount (each of the four); the pages also count against the task's
# memory limit, as tmpfs pages are charged to the cgroup that writes them.
DEFAULT_TMP_SIZE = 128 << 20

# Exit codes of the gate, as the shell gate used them.
EXIT_GATE_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


@dataclass(frozen=True)
class Sandbox:
    """The account a task runs as and what it is confined to.

    ``home``: the mapped account's home directory, or None for an allocated
    uid, whose HOME is its private /tmp. A task mapped to uid 0 is not
    confined: it runs as today, with root's powers and view of the host.
    """

    uid: int
    gid: int
    home: Optional[str] = None
    tmp_size: int = DEFAULT_TMP_SIZE

    @property
    def confined(self) -> bool:
        return self.uid != 0

    def gate_argv(self, cwd: str, executable: str, args: list, join: Sequence[str] = ()) -> list:
        """The argv for posix_spawn of GATE: it runs ``executable args...`` in ``cwd``.

        ``executable`` is an absolute path (see process.resolve); the command's
        own argv[0] is ``executable`` as given. ``join``: the cgroup.procs
        files the gate writes itself into first (the task's groups).
        """
        options = [word for path in join for word in ("-c", path)]
        if self.confined:
            options += ["-u", str(self.uid), "-g", str(self.gid), "-t", str(self.tmp_size), "-p"]
        return [GATE, *options, "--", cwd, executable, executable, *args]

    def environment(self, env: dict) -> dict:
        """``env`` with HOME set for this account (the private /tmp without a home)."""
        if not self.confined:
            return dict(env)
        return {**env, "HOME": self.home or "/tmp"}

    def check_executable(self, path: str) -> None:
        """Raise NotExecutable unless this account may execute the file at ``path``.

        StartTask reports a command the task's user cannot run as
        INVALID_ARGUMENT, not as an exit 126 later. Mode bits only (the
        account has no supplementary groups; ACLs are not read): the gate's
        exec remains the final word.
        """
        if not self.confined:
            return
        resolved = os.path.realpath(path)
        directory = os.path.dirname(resolved)
        walked = "/"
        for part in [""] + [part for part in directory.split("/") if part]:
            walked = os.path.join(walked, part)
            if not self._may(walked, stat.S_IXUSR):
                raise NotExecutable(f"{path}: permission denied (directory {walked} is closed to the task's user)")
        try:
            info = os.stat(resolved)
        except FileNotFoundError:
            raise CommandNotFound(f"{path}: no such file") from None
        if not stat.S_ISREG(info.st_mode) or not self._allowed(info, stat.S_IXUSR):
            raise NotExecutable(f"{path}: permission denied for the task's user")

    def _may(self, path: str, user_bit: int) -> bool:
        try:
            return self._allowed(os.stat(path), user_bit)
        except OSError:
            return False

    def _allowed(self, info: os.stat_result, user_bit: int) -> bool:
        # The kernel uses the first class that matches, even if it grants less.
        if info.st_uid == self.uid:
            return bool(info.st_mode & user_bit)
        if info.st_gid == self.gid:
            return bool(info.st_mode & (user_bit >> 3))
        return bool(info.st_mode & (user_bit >> 6))


UNCONFINED = Sandbox(uid=0, gid=0)


def in_gate(pid: int) -> bool:
    """True while process ``pid`` still runs GATE (it has not exec'd the
    command yet: it may still be joining its groups)."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == _GATE_REAL
    except OSError:
        return False


_GATE_REAL = os.path.realpath(GATE)


def check_gate() -> str:
    """Return GATE's path; raise ConfigError if the install did not build it."""
    if not os.access(GATE, os.X_OK):
        raise ConfigError(f"{GATE} is missing or not executable: reinstall taskman with a C compiler present"
                          " (pip install . compiles it)")
    return GATE
