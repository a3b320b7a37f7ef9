"""Which account each identity's tasks run as.

By default every identity (certificate CN) gets a uid and gid of its own,
allocated from a reserved range and recorded in a host-wide registry, so
that its tasks keep their uid across restarts and no two identities ever
share one, even between several servers on one host with different state
directories. An operator may instead map identities to existing accounts
with a user map (``--user-map``), root included.

The default range, 70000-99999, lies outside the ranges systemd reserves
(https://systemd.io/UIDS-GIDS/: system and regular users below 60001,
systemd-homed 60001-60513, DynamicUser 61184-65519, nobody 65534, 16-bit -1
65535, containers from 524288) and below 100000, where useradd starts the
subordinate ranges of /etc/subuid; ids of existing accounts and groups, and
ids inside any subordinate range, are never handed out.
"""

import fcntl
import grp
import logging
import os
import pwd
import re
from typing import Dict, Iterable, Optional

from taskman.errors import ConfigError, InvalidArgument, ResourceExhausted
from taskman.sandbox import DEFAULT_TMP_SIZE, Sandbox, check_gate

log = logging.getLogger(__name__)

# Host-wide, outside any one server's state directory.
REGISTRY_PATH = "/var/lib/taskman-users/registry"
DEFAULT_IDS = range(70000, 100000)

IDENTITY = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SUBORDINATE_FILES = ("/etc/subuid", "/etc/subgid")


def check_identity(identity: str) -> str:
    if not IDENTITY.fullmatch(identity):
        raise InvalidArgument(f"{identity!r} is not a valid identity")
    return identity


def parse_ids(text: str) -> range:
    """Parse ``FIRST-LAST`` (inclusive) into a range; raise ConfigError."""
    match = re.fullmatch(r"(\d+)-(\d+)", text.strip())
    if not match or not 0 < int(match[1]) <= int(match[2]) < 2**32 - 1:
        raise ConfigError(f"{text!r} is not a uid range FIRST-LAST above 0")
    return range(int(match[1]), int(match[2]) + 1)


class Registry:
    """Host-wide identity -> uid allocations: one ``identity uid`` line each, append-only.

    Every allocation holds an exclusive flock on the file, so servers on one
    host (and their threads) allocate one at a time. The gid equals the uid.
    """

    def __init__(self, path: str = REGISTRY_PATH, ids: range = DEFAULT_IDS):
        self.path = path
        self.ids = ids
        self._known: Dict[str, int] = {}
        self._checked: Dict[str, tuple] = {}

    def uid_of(self, identity: str) -> int:
        """Return the identity's uid, allocating one on first use.

        Raises ConfigError (unreadable or corrupt registry, or its uid now
        belongs to an account of the host) or ResourceExhausted (range full).
        """
        check_identity(identity)
        uid = self._known.get(identity)
        if uid is None:
            uid = self._allocate(identity)
            self._known[identity] = uid
        # Looking the uid up costs more than the rest of a start's checks:
        # do it again only when the account databases changed.
        stamp = _accounts_stamp()
        if self._checked.get(identity) != stamp:
            self._check_still_free(identity, uid)
            self._checked[identity] = stamp
        return uid

    def _allocate(self, identity: str) -> int:
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise ConfigError(f"cannot open the uid registry {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            allocations = self._read(fd)
            if identity in allocations:
                return allocations[identity]
            uid = self._free_id(set(allocations.values()))
            os.write(fd, f"{identity} {uid}\n".encode())
            os.fsync(fd)
            log.info("allocated uid %d to identity %s in %s", uid, identity, self.path)
            return uid
        finally:
            os.close(fd)  # releases the lock

    def _read(self, fd: int) -> Dict[str, int]:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        allocations = {}
        for number, line in enumerate(b"".join(chunks).decode("ascii", "replace").splitlines(), 1):
            fields = line.split()
            if len(fields) != 2 or not IDENTITY.fullmatch(fields[0]) or not fields[1].isdigit():
                raise ConfigError(f"{self.path}:{number}: expected 'identity uid', found {line[:100]!r}")
            allocations.setdefault(fields[0], int(fields[1]))
        return allocations

    def _free_id(self, taken: set) -> int:
        subordinate = list(_subordinate_ranges())
        for candidate in self.ids:
            if candidate in taken or _account_exists(candidate):
                continue
            if any(candidate in span for span in subordinate):
                continue
            return candidate
        raise ResourceExhausted(f"no free uid left in {self.ids.start}-{self.ids.stop - 1} ({self.path})")

    def _check_still_free(self, identity: str, uid: int) -> None:
        # An account created after the allocation would share its files with the task.
        if _account_exists(uid):
            raise ConfigError(f"uid {uid}, allocated to {identity} in {self.path}, now belongs to an account"
                              " or group of the host: remove that account or that line")


ACCOUNT_FILES = ("/etc/passwd", "/etc/group")


def _accounts_stamp() -> tuple:
    """What changes when an account or group is added (local files; NSS
    sources such as LDAP are seen at the next change of these, or a restart)."""
    stamp = []
    for path in ACCOUNT_FILES:
        try:
            info = os.stat(path)
            stamp.append((info.st_mtime_ns, info.st_ino, info.st_size))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def _account_exists(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _subordinate_ranges() -> Iterable[range]:
    for path in SUBORDINATE_FILES:
        try:
            with open(path) as lines:
                for line in lines:
                    fields = line.strip().split(":")
                    if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                        yield range(int(fields[1]), int(fields[1]) + int(fields[2]))
        except OSError:
            continue


def load_user_map(path: str) -> Dict[str, Sandbox]:
    """Read a user map: one ``identity account`` pair a line, ``#`` comments.

    Returns identity -> Sandbox of the existing account (its uid, primary gid
    and home). Raises ConfigError for an unknown account, a bad identity or a
    repeated one. A mapping to root is logged as a WARNING: such tasks run
    unconfined and own the server's state directory.
    """
    try:
        with open(path) as lines:
            text = lines.read()
    except OSError as error:
        raise ConfigError(f"cannot read the user map {path}: {error.strerror}") from None
    mapping = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 2:
            raise ConfigError(f"{where}: expected 'identity account', found {line.strip()[:100]!r}")
        identity, account = fields
        if not IDENTITY.fullmatch(identity):
            raise ConfigError(f"{where}: {identity!r} is not a valid identity")
        if identity in mapping:
            raise ConfigError(f"{where}: {identity} is mapped twice")
        try:
            entry = pwd.getpwnam(account)
        except KeyError:
            raise ConfigError(f"{where}: no account named {account!r} on this host") from None
        home = entry.pw_dir if entry.pw_dir and os.path.isdir(entry.pw_dir) else None
        mapping[identity] = Sandbox(uid=entry.pw_uid, gid=entry.pw_gid, home=home)
        if entry.pw_uid == 0:
            log.warning("%s: identity %s is mapped to %s (uid 0): its tasks run as root, outside the sandbox,"
                        " and can read and change the server's state", where, identity, account)
    return mapping


class Users:
    """identity -> Sandbox: the user map first, else a uid of the identity's own."""

    def __init__(self, registry: Optional[Registry] = None, user_map: Optional[Dict[str, Sandbox]] = None,
                 tmp_size: int = DEFAULT_TMP_SIZE):
        self.registry = registry or Registry()
        self.user_map = dict(user_map or {})
        self.tmp_size = tmp_size

    def sandbox_for(self, identity: str) -> Sandbox:
        """Return the sandbox for ``identity``'s tasks; raises as Registry.uid_of."""
        mapped = self.user_map.get(identity)
        if mapped is not None:
            return Sandbox(mapped.uid, mapped.gid, mapped.home, self.tmp_size)
        uid = self.registry.uid_of(identity)
        return Sandbox(uid=uid, gid=uid, tmp_size=self.tmp_size)


def for_server(user_map_path: Optional[str], ids: range = DEFAULT_IDS) -> Optional[Users]:
    """The server's Users: the gate checked (ConfigError if the install did
    not build it), the user map read, uids allocated from ``ids``.

    None for a server that is not root: it cannot change uid, so its tasks
    run as its own user (a WARNING says so).
    """
    check_gate()
    if os.geteuid() != 0:
        log.warning("the server is not root: tasks run as its own uid %d, not sandboxed"
                    " (docs/security.md)", os.geteuid())
        return None
    user_map = load_user_map(user_map_path) if user_map_path else {}
    return Users(Registry(ids=ids), user_map)
