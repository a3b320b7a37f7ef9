"""The server's private files: the state directory and every key, closed to tasks.

Tasks run as other uids (taskman.sandbox), so what keeps them from the
records, the output of other users, the audit log and the PKI is plain
file modes: directories 0700 and files 0600, owned by the server's user.
Files are created so; ``secure`` also fixes what an older taskman, an
operator or a restore left open, at every start. Certificates and revocation lists (``*.crt``, ``*.crl``)
are public and may stay readable (0644): inside a 0700 directory nobody
else reaches them anyway.
"""

import logging
import os
import stat
from typing import Iterable, List

log = logging.getLogger("taskman.private")

PUBLIC_SUFFIXES = (".crt", ".crl")


def problems(paths: Iterable[str]) -> List[str]:
    """One sentence per file or directory under ``paths`` (walked) whose mode
    or owner lets someone other than the server's user in. [] when all is well."""
    return [problem for path, info in _walk(paths) if (problem := _problem(path, info))]


def secure(paths: Iterable[str]) -> List[str]:
    """Fix what ``problems`` would report: return the sentences of what was fixed.

    Raises OSError if a mode or owner cannot be changed.
    """
    fixed = []
    for path, info in _walk(paths):
        problem = _problem(path, info)
        if not problem:
            continue
        if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(path, os.geteuid(), os.getegid(), follow_symlinks=False)
        os.chmod(path, _wanted_mode(path, info), follow_symlinks=False)
        fixed.append(problem)
    return fixed


def _walk(paths: Iterable[str]):
    for top in paths:
        try:
            info = os.lstat(top)
        except FileNotFoundError:
            continue
        yield top, info
        if not stat.S_ISDIR(info.st_mode):
            continue
        for directory, names, files in os.walk(top):
            for name in names + files:
                path = os.path.join(directory, name)
                try:
                    yield path, os.lstat(path)
                except FileNotFoundError:
                    continue


def _wanted_mode(path: str, info: os.stat_result) -> int:
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISDIR(info.st_mode):
        return (mode & 0o700) | 0o700
    if path.endswith(PUBLIC_SUFFIXES):
        return mode & ~0o022  # readable by others is harmless, writable is not
    return mode & 0o700


def _problem(path: str, info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return ""  # its target is walked where it lives, if it is ours
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        return f"{path} is owned by uid {info.st_uid}, not the server's ({os.geteuid()})"
    if mode != _wanted_mode(path, info):
        return f"{path} has mode {mode:04o}, wanted {_wanted_mode(path, info):04o}"
    return ""


def close_to_tasks(paths: Iterable[str]) -> int:
    """``secure`` at start-up, each fix logged as a WARNING; return how many."""
    fixed = secure(path for path in paths if path)
    for problem in fixed:
        log.warning("closing the server's files to tasks: %s: fixed", problem)
    return len(fixed)
