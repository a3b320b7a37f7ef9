"""The library's exceptions.

Raised by the core, mapped to gRPC status codes once, in ``taskman.service``.
Messages are written for the person who made the request: they reach the CLI.
"""


# Messages quote the request (a command, a task id) and travel in the call's
# trailers, which gRPC clients cap at 16 KiB: quoting a MB-sized input whole
# turned an INVALID_ARGUMENT into the client's RESOURCE_EXHAUSTED.
MAX_MESSAGE = 2000


class TaskmanError(Exception):
    """Base class; an unexpected internal failure when raised as itself."""

    def __init__(self, message: str = "", *args):
        if isinstance(message, str) and len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "... (truncated)"
        super().__init__(message, *args)


class InvalidArgument(TaskmanError):
    """The request itself is malformed (empty command, NUL byte, bad id...)."""


class CommandNotFound(InvalidArgument):
    """The command is neither an existing path nor found on the server's PATH."""


class NotExecutable(InvalidArgument):
    """The command exists but cannot be executed (a directory, no x bit...)."""


class NotFound(TaskmanError):
    """No such task, or it belongs to somebody else: the two are not told apart."""


class ResourceExhausted(TaskmanError):
    """A server limit was reached (streams, tasks, disk); retrying later may work."""


class Unavailable(TaskmanError):
    """The manager is shutting down and accepts no new work."""


class CgroupError(TaskmanError):
    """A cgroup could not be created, configured, joined or removed."""


class Unauthenticated(TaskmanError):
    """The caller's identity could not be established (no TLS 1.3, no single CN...)."""


class ConfigError(TaskmanError):
    """A setting, certificate or key the server was given cannot be used."""


class StoreError(TaskmanError):
    """The task store cannot be opened or is of an unknown format."""
