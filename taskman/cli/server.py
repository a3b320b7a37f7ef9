"""taskman-server: serve the TaskManager API over mutual TLS 1.3.

Order matters and is kept in ``main``: the TLS 1.3 restriction and the fork
setting must be in the environment before grpc is imported, gevent must patch
the standard library before that import, and grpc's gevent integration must
be initialised before any gRPC object exists. So this module imports nothing
of gevent or grpc at the top; taskman.server, which builds the server, is
imported once they are in place.
"""

import logging
import os
import sys

import docopt

from taskman.cgroups import Limits
from taskman.cli.settings import Settings
from taskman.defaults import DEFAULT_MAX_STREAMS, version
from taskman.errors import TaskmanError

USAGE = """\
Usage:
  taskman-server [--server-address <host:port>] [options] [--io-device <MAJ:MIN>]...
  taskman-server --help
  taskman-server --version

Description:
  This service manages task lifecycle (start, stop, status) and streams output to clients over a secure mTLS connection.

Options:
  --server-address <host:port>
      The address the gRPC server will listen on (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --ca-cert <path>
      CA certificate that client certificates must be signed by.
      Defaults to ca.crt in $TASKMAN_CERTS_DIR or in the certificates shipped with taskman.
  --server-cert <path>
      The server's certificate (PEM). Defaults to server.crt beside the CA certificate's default.
  --server-key <path>
      The server's private key (PEM). Defaults to server.key beside the CA certificate's default.
  --state-dir <dir>
      Where task output is kept. Defaults to /var/lib/taskman for root,
      ~/.local/state/taskman otherwise.
  --cgroup-driver <kind>
      auto, v2, hybrid or none [default: auto]. auto refuses to start when the
      limits cannot be enforced on this host; none runs tasks WITHOUT limits.
  --cgroup-root <name>
      The directory, beneath the server's own cgroup in each hierarchy, that holds
      the task groups [default: taskman]. Two servers on one host need two names.
  --cpu-quota-us <us>
      CPU time per period for each task; 0 for no limit [default: {cpu_quota_us}].
  --cpu-period-us <us>
      CPU bandwidth period [default: {cpu_period_us}].
  --memory-max <size>
      Memory limit per task, in bytes or with a K, M, G suffix (e.g., 512M);
      0 for no limit [default: 512M].
  --io-read-bps <bytes>
      Read bandwidth limit per task and device, bytes/s; 0 for none [default: {io_read_bps}].
  --io-write-bps <bytes>
      Write bandwidth limit per task and device, bytes/s; 0 for none [default: {io_write_bps}].
  --io-device <MAJ:MIN>
      A block device the IO limits apply to; repeatable. Defaults to the devices
      backing the host's file systems.
  --pids-max <n>
      Processes and threads per task; 0 for no limit [default: {pids_max}].
  --stop-grace <seconds>
      Time between SIGTERM and SIGKILL when a task is stopped [default: 10].
  --max-streams <n>
      Concurrent output streams; more are refused with RESOURCE_EXHAUSTED [default: {max_streams}].
  --task-output-max <size>
      Output kept per task (e.g., 1G); past it, one marker line, then the rest
      is dropped and the status says so. 0 for no cap [default: 1G].
  --retention <duration>
      How long finished tasks (record and output) are kept, e.g. 12h, 7d;
      0 keeps them until the budget below removes them [default: 7d].
  --output-budget <size>
      Disk space for finished tasks' output; past it the oldest finished tasks
      are removed. 0 for no budget [default: 10G].
  --log-level <level>
      debug, info, warning or error [default: info].
  --audit-log <path>
      Append-only audit trail: one JSON line per call and per task start, stop and
      end (never task output). Defaults to audit.log in the state directory.
  --metrics-address <host:port>
      Serve Prometheus metrics over plain HTTP at http://<host:port>/metrics. Off
      unless given; use a local address (e.g., localhost:9464).
  --check
      Check the certificates, the cgroup driver, the state directory and the audit
      log, print one OK or FAIL line each and exit, without serving or touching tasks.
  --version
      Print the version of taskman-server and exit (it is also in the start-up log,
      in --check and in every response's taskman-version header).
  --help
      Display help information for the server command.

Environment:
  TASKMAN_CERTS_DIR   directory holding ca.crt, server.crt and server.key.

Exit status:
  0 stopped cleanly by SIGTERM or SIGINT; 1 could not start or failed; 2 usage error.
  With --check: 0 every check passed; 1 at least one failed.

Example:
  $ taskman-server --server-address localhost:12345
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def usage() -> str:
    limits = Limits()
    return USAGE.format(cpu_quota_us=limits.cpu_quota_us, cpu_period_us=limits.cpu_period_us,
                        io_read_bps=limits.io_read_bps, io_write_bps=limits.io_write_bps,
                        pids_max=limits.pids_max, max_streams=DEFAULT_MAX_STREAMS)


def main(argv=None) -> int:
    text = usage()
    try:
        options = docopt.docopt(text, argv=argv, default_help=False)
    except docopt.DocoptExit as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    if options["--help"]:
        print(text, end="")
        return EXIT_OK
    if options["--version"]:
        print(f"taskman-server {version()}")
        return EXIT_OK
    try:
        settings = Settings(options)
    except TaskmanError as error:
        print(f"taskman-server: {error}", file=sys.stderr)
        return EXIT_USAGE

    if settings.check:  # imports neither grpc nor gevent
        from taskman.cli import check

        print(f"taskman-server {version()}")
        return check.run(settings)

    # The order below is the one docs/design.md records; see the module docstring.
    from taskman import tls

    tls.restrict_to_tls13()
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    from gevent import monkey

    monkey.patch_all()
    import grpc
    import grpc.experimental.gevent

    grpc.experimental.gevent.init_gevent()

    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from taskman import server

    server.log.info("taskman-server %s", version())
    try:
        return server.serve(settings)
    except TaskmanError as error:
        print(f"taskman-server: {error}", file=sys.stderr)
        return EXIT_FAILED
