"""Has a file perhaps changed since last asked? One cheap read to know.

The server checks its revocation list before every call so that a revoked
certificate is refused on its very next call. A stat per call does that but
walks the path and releases the GIL (which gRPC's threads may then hold for
a while). ``FileWatch.changed`` instead reads an inotify descriptor through
ctypes without releasing the GIL: -1/EAGAIN means nothing that could matter
happened, so the caller skips its stat and reload.

Exactness before speed: ``changed`` answers False only while the watch is
armed and the kernel reported nothing about the file, its directory or the
names leading to it. inotify reports a change synchronously, inside the
writer's write(), rename() or unlink(), so a change finished before a call
arrives is queued by then. The watch refuses to arm (the caller stats per
call instead, as before) when inotify cannot be had, when the path holds a
symbolic link (a link swapped elsewhere, as in Kubernetes secret volumes, is
reported to no watch here), or when a directory on the way is on a file
system that is not local (NFS, FUSE, 9p, CIFS: changes made by another host
are never reported). It disarms itself, answering True, when the queue
overflows or a watched directory is removed, moved or unmounted.

The descriptor is close-on-exec: tasks and a reload's exec never get it.
"""

import ctypes
import errno
import os
import stat
import struct
from typing import Dict, Optional

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000

_NAMES = _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_SELF = _IN_DELETE_SELF | _IN_MOVE_SELF
# The file's own directory: its name's comings and goings and, through the
# directory, writes to it. The directories above: only the next name's.
_DIRECTORY_MASK = (_NAMES | _SELF | _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE
                   | _IN_ONLYDIR | _IN_DONT_FOLLOW)
_ANCESTOR_MASK = _NAMES | _SELF | _IN_ONLYDIR | _IN_DONT_FOLLOW
# The file's inode itself, so that a write through another hard link or a
# bind mount of the file is seen too.
_FILE_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _SELF | _IN_DONT_FOLLOW
# A watched directory gone or the queue overflowed: the watch can no longer
# vouch for anything.
_LOST = _IN_Q_OVERFLOW | _IN_UNMOUNT | _SELF | _IN_IGNORED

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

# statfs f_type of the file systems whose changes all go through this kernel.
LOCAL_FILE_SYSTEMS = frozenset({
    0xEF53,      # ext2/3/4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0x01021994,  # tmpfs
    0x858458F6,  # ramfs
    0xF2F52010,  # f2fs
    0x2FC12FC1,  # zfs
    0x794C7630,  # overlayfs
})

_BUFFER_SIZE = 64 * 1024


def _load_libc():
    # PyDLL: its calls keep the GIL, so a read of an empty queue never lets
    # another thread in. Lookups fail on a libc without inotify.
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    libc.statfs.restype = ctypes.c_int
    return libc


_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        _libc = _load_libc()
    return _libc


def file_system_type(libc, path: str) -> int:
    """statfs' f_type for ``path`` (a long at the start of struct statfs)."""
    buffer = ctypes.create_string_buffer(256)
    if libc.statfs(os.fsencode(path), buffer) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), path)
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


class NotWatchable(Exception):
    """Why a path cannot be watched exactly (the caller stats instead)."""


class FileWatch:
    """Change signal for one file path, from one inotify descriptor.

    ``arm`` before reading the file; then ``changed`` before each use: True
    (re-read the file, then carry on) or False (nothing happened to it).
    While not ``armed`` ``changed`` is always True and the caller is
    expected to stat as it did before; ``arm`` may be tried again later.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.reason: Optional[str] = "not armed yet"
        self._fd = -1
        self._buffer = ctypes.create_string_buffer(_BUFFER_SIZE)
        self._size = ctypes.c_size_t(_BUFFER_SIZE)
        self._names: Dict[int, bytes] = {}  # directory wd -> the name that matters in it
        self._directory_wd = -1
        self._file_wd = -1
        self._read = None

    @property
    def armed(self) -> bool:
        return self._fd >= 0

    def arm(self) -> bool:
        """Watch the path afresh; False (with ``reason``) if it cannot be."""
        self.close()
        try:
            libc = _get_libc()
            self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if self._fd < 0:
                self._fd = -1
                raise NotWatchable(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
            # Without argtypes (given an int, the buffer and a c_size_t, the
            # result an int), the call costs a third of the declared one.
            self._read = libc["read"]
            self._check_path(libc)
            self._watch_path(libc)
            # A link or mount swapped in while the watches were being added
            # would not be reported: look at the path again, now watched.
            self._check_path(libc)
        except (NotWatchable, OSError, AttributeError) as error:
            self.close()
            self.reason = str(error) or type(error).__name__
            return False
        self.reason = None
        return True

    def _check_path(self, libc) -> None:
        directory = os.path.dirname(self.path)
        if os.path.realpath(directory) != directory:
            raise NotWatchable(f"{directory} goes through a symbolic link")
        try:
            if stat.S_ISLNK(os.lstat(self.path).st_mode):
                raise NotWatchable(f"{self.path} is a symbolic link")
        except FileNotFoundError:
            pass
        for path in _directories(directory):
            kind = file_system_type(libc, path)
            if kind not in LOCAL_FILE_SYSTEMS:
                raise NotWatchable(f"{path} is on a file system inotify cannot vouch for ({kind:#x})")

    def _watch_path(self, libc) -> None:
        directory = os.path.dirname(self.path)
        chain = _directories(directory)
        for parent, child in zip(chain[:-1], chain[1:], strict=True):
            self._names[self._add(libc, parent, _ANCESTOR_MASK)] = os.fsencode(os.path.basename(child))
        self._directory_wd = self._add(libc, directory, _DIRECTORY_MASK)
        self._names[self._directory_wd] = os.fsencode(os.path.basename(self.path))
        self._watch_file(libc)

    def _add(self, libc, path: str, mask: int) -> int:
        wd = libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify_add_watch: {os.strerror(error)}", path)
        return wd

    def _watch_file(self, libc) -> None:
        """Watch the inode now at the path (none if absent)."""
        try:
            wd = self._add(libc, self.path, _FILE_MASK)
        except FileNotFoundError:
            wd = -1
        if self._file_wd >= 0 and wd != self._file_wd:
            libc.inotify_rm_watch(self._fd, self._file_wd)
        self._file_wd = wd
        if wd >= 0 and stat.S_ISLNK(os.lstat(self.path).st_mode):
            raise NotWatchable(f"{self.path} is a symbolic link")

    def changed(self) -> bool:
        """True unless armed and nothing was reported since the last call."""
        if self._fd < 0:
            return True
        count = self._read(self._fd, self._buffer, self._size)
        if count < 0 and ctypes.get_errno() == errno.EAGAIN:
            return False
        return self._drain(count)

    def _drain(self, count: int) -> bool:
        relevant = False
        while count != 0:
            if count < 0:
                if ctypes.get_errno() == errno.EAGAIN:
                    break
                return self._lose(f"read: {os.strerror(ctypes.get_errno())}")
            data = self._buffer.raw[:count]
            offset = 0
            while offset < count:
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:  # wd -1, like an absent file's
                    return self._lose("the event queue overflowed (0x4000)")
                if wd == self._file_wd:
                    relevant = True
                    if mask & (_SELF | _IN_IGNORED):
                        self._file_wd = -1
                elif wd in self._names:
                    if mask & _LOST:
                        return self._lose(f"event {mask:#x} on the watch of {self.path}")
                    if name == self._names[wd]:
                        relevant = True
                        if wd == self._directory_wd and mask & _NAMES:
                            self._renamed()
                        elif wd != self._directory_wd:
                            # A directory on the way replaced: re-arm from scratch.
                            return self._lose(f"a directory above {self.path} changed")
                elif not mask & _IN_IGNORED:
                    relevant = True  # a previous inode of the file
            if self._fd < 0:
                return True
            count = self._read(self._fd, self._buffer, self._size)
        return relevant

    def _renamed(self) -> None:
        try:
            self._watch_file(_get_libc())
        except (NotWatchable, OSError) as error:
            self._lose(str(error))

    def _lose(self, reason: str) -> bool:
        self.close()
        self.reason = reason
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._names = {}
        self._directory_wd = self._file_wd = -1

    def __del__(self):
        self.close()

    def fileno(self) -> int:
        """The inotify descriptor, -1 when not armed."""
        return self._fd


def _directories(directory: str):
    """``directory`` and every directory above it, from / down."""
    chain = [directory]
    while chain[-1] != os.path.dirname(chain[-1]):
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]
