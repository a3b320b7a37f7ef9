"""The PKI's files as bytes: stamps, reads and atomic writes.

Apart from taskman.pki.files so that what only watches or reads the files
(the server's reloading credentials, its revocation check before every
call) does not import cryptography, which costs more than grpc does.
"""

import contextlib
import os
import tempfile

from taskman.errors import ConfigError


def file_stamp(path: str):
    """(inode, size, mtime) of ``path``, None if absent: a change of file."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` whole or not at all, with ``mode`` from the first byte."""
    directory = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path))
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_file(path: str, what: str) -> bytes:
    """The bytes of ``path``; ConfigError naming it (as ``what``) if unreadable."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror}") from None



def _make_directory(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
