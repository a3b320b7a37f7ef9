"""Names and defaults shared by the CLI, the server and the library.

Standard library only, and nothing here imports grpc or gevent: the CLI and
the server's option parsing read these before (or without) importing either.
"""

import os

DEFAULT_ADDRESS = "localhost:50051"

# Concurrent output streams per server; each holds an executor worker.
DEFAULT_MAX_STREAMS = 256
# Health Watch and reflection streams open at once, apart from output streams.
DEFAULT_MAX_HEALTH_STREAMS = 16

# Fair sharing's paces, applied only while another user is active
# (taskman.turns; docs/operations.md): a user's calls that queue behind its own,
# a second; and each user's output messages, all its streams together.
DEFAULT_CALL_RATE = 50.0
DEFAULT_SEND_RATE = 100.0

# The proto's enum names, in number order: written out rather than built from
# taskman.task.JobStatus, whose imports cost the CLI's start (test_defaults
# holds the two together).
JOB_STATUS_PREFIX = "JOB_STATUS_"
JOB_STATUS_NAMES = tuple(JOB_STATUS_PREFIX + name for name in
                         ("UNKNOWN", "STARTED", "SIGNALED", "EXITED_OK", "EXITED_ERROR"))

CERTS_DIR_VARIABLE = "TASKMAN_CERTS_DIR"


def default_state_dir() -> str:
    """/var/lib/taskman for root; $XDG_STATE_HOME/taskman (~/.local/state) otherwise."""
    if os.geteuid() == 0:
        return "/var/lib/taskman"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "taskman")


VERSION_OVERRIDE_VARIABLE = "TASKMAN_VERSION_OVERRIDE"


def version() -> str:
    """The running code's version, as the server reports it and ``--version``
    prints it: ``taskman.__version__``, which setup.cfg also builds the
    package's version from (one source; asking the installed distribution's
    metadata scanned every installed package, ~40 ms of a reload's check).

    $TASKMAN_VERSION_OVERRIDE, when set, is reported instead: the reload's
    tests stand in a changed build with it (docs/operations.md, upgrading).
    """
    override = os.environ.get(VERSION_OVERRIDE_VARIABLE)
    if override:
        return override
    from taskman import __version__

    return __version__
