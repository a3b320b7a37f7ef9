"""taskman-server: serve the TaskManager API over mutual TLS 1.3.

Order matters and is kept in ``main``: the TLS 1.3 restriction and the fork
setting must be in the environment before grpc is imported, gevent must patch
the standard library before that import, and grpc's gevent integration must
be initialised before any gRPC object exists. So this module imports nothing
of gevent or grpc at the top.
"""

import logging
import os
import re
import sys

import docopt

from taskman.cgroups import Limits

USAGE = """\
Usage:
  taskman-server [--server-address <host:port>] [options] [--io-device <MAJ:MIN>]...
  taskman-server --help

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

DEFAULT_ADDRESS = "localhost:50051"
# Each open stream holds an executor worker (a greenlet, ~0.1 MB, NOTES.md).
# Not taken from taskman.service: importing it would import grpc too early.
DEFAULT_MAX_STREAMS = 256
SHUTDOWN_MARGIN = 30.0  # seconds in-flight calls get beyond the tasks' stop grace

log = logging.getLogger("taskman.server")


class StartupError(Exception):
    """Why the server cannot start, as one sentence for the operator."""


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
        return 2
    if options["--help"]:
        print(text, end="")
        return 0
    try:
        settings = Settings(options)
    except StartupError as error:
        print(f"taskman-server: {error}", file=sys.stderr)
        return 2

    if settings.check:  # imports neither grpc nor gevent
        from taskman.cli import check

        return check.run(settings)

    # The order below is the one NOTES.md measured to work; see the module docstring.
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
    try:
        return serve(settings)
    except StartupError as error:
        print(f"taskman-server: {error}", file=sys.stderr)
        return 1


class Settings:
    """The parsed command line; StartupError for a value that cannot be used."""

    def __init__(self, options: dict):
        self.address = options["--server-address"] or DEFAULT_ADDRESS
        self.host, self.port = split_address(self.address)
        self.ca_cert = options["--ca-cert"]
        self.server_cert = options["--server-cert"]
        self.server_key = options["--server-key"]
        self.state_dir = options["--state-dir"]
        self.driver = options["--cgroup-driver"]
        if self.driver not in ("auto", "v2", "hybrid", "none"):
            raise StartupError(f"unknown cgroup driver {self.driver!r}: "
                               "use auto, v2, hybrid or none")
        self.cgroup_root = options["--cgroup-root"]
        self.limits = Limits(
            cpu_quota_us=count(options["--cpu-quota-us"], "--cpu-quota-us"),
            cpu_period_us=count(options["--cpu-period-us"], "--cpu-period-us", minimum=1),
            memory_max=parse_size(options["--memory-max"]),
            io_read_bps=count(options["--io-read-bps"], "--io-read-bps"),
            io_write_bps=count(options["--io-write-bps"], "--io-write-bps"),
            io_devices=tuple(parse_device(value) for value in options["--io-device"]),
            pids_max=count(options["--pids-max"], "--pids-max"))
        try:
            self.stop_grace = float(options["--stop-grace"])
        except ValueError:
            self.stop_grace = -1.0
        if not 0 <= self.stop_grace <= 3600:
            raise StartupError(f"--stop-grace must be 0 to 3600 seconds, "
                               f"not {options['--stop-grace']!r}")
        self.max_streams = count(options["--max-streams"], "--max-streams", minimum=1)
        self.task_output_max = parse_size(options["--task-output-max"], "--task-output-max")
        self.retention = parse_duration(options["--retention"], "--retention")
        self.output_budget = parse_size(options["--output-budget"], "--output-budget")
        level = options["--log-level"].upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise StartupError(f"unknown log level {options['--log-level']!r}")
        self.log_level = getattr(logging, level)
        self.check = bool(options["--check"])
        self.audit_log = options["--audit-log"]
        self.metrics_address = options["--metrics-address"]
        if self.metrics_address:
            self.metrics_host, self.metrics_port = split_address(self.metrics_address,
                                                                 "--metrics-address")


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit status."""
    import signal
    from concurrent import futures

    import gevent
    import gevent.event
    import grpc

    from taskman import tls
    from taskman.api import task_manager_pb2_grpc
    from taskman.cgroups import select_driver
    from taskman.errors import TaskmanError
    from taskman.manager import TaskManager, default_state_dir
    from taskman.output import ensure_directory
    from taskman.service import GuardInterceptor, TaskManagerServicer

    try:
        ca, cert, key = tls.server_files(settings.ca_cert, settings.server_cert,
                                         settings.server_key)
        credentials = tls.server_credentials(ca, cert, key)
    except tls.TLSConfigError as error:
        raise StartupError(str(error)) from None

    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)

    executor = futures.ThreadPoolExecutor(
        max_workers=TaskManagerServicer.executor_workers(settings.max_streams),
        thread_name_prefix="rpc")
    guard = GuardInterceptor()  # health and reflection calls through _call too
    server = grpc.server(executor, interceptors=[guard], options=[
        # Without this a second server could bind the same port (gRPC sets
        # SO_REUSEPORT by default) and the two would split the clients.
        ("grpc.so_reuseport", 0),
        # Find clients that vanished without closing, so their streams end.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ])
    # Bind first: a port in use must not cost a pass over the state directory
    # and the cgroups (whose clean-up could disturb the server holding it).
    try:
        port = server.add_secure_port(settings.address, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise StartupError(f"cannot listen on {settings.address}: the address is in use "
                           "or not available")

    try:
        state_dir = ensure_directory(settings.state_dir or default_state_dir())
        # The IO limits default to the disks holding / and the task output.
        driver = select_driver(settings.driver, settings.limits, settings.cgroup_root,
                               io_paths=("/", state_dir))
        manager = TaskManager(state_dir=state_dir, driver=driver,
                              stop_grace=settings.stop_grace,
                              output_max_bytes=settings.task_output_max,
                              retention_age=settings.retention,
                              retention_bytes=settings.output_budget)
    except TaskmanError as error:
        raise StartupError(f"cannot set up tasks: {error}") from None
    except OSError as error:
        raise StartupError(f"cannot set up tasks: {error.strerror} "
                           f"({error.filename or ''})") from None

    try:
        audit, metrics, metrics_server = observers(settings, manager)
    except StartupError:
        manager.shutdown(timeout=0)
        raise
    servicer = TaskManagerServicer(manager, max_streams=settings.max_streams,
                                   audit=audit, metrics=metrics)
    guard.servicer = servicer
    task_manager_pb2_grpc.add_TaskManagerServicer_to_server(servicer, server)
    health = add_health_and_reflection(server)
    server.start()

    try:
        refusal = tls.check_tls13_only(probe_host(settings.host), port)
    except (tls.TLS12Accepted, OSError) as error:
        audit.record("server.refused_to_start", reason=f"TLS 1.3-only self-test failed: {error}")
        server.stop(None)
        manager.shutdown(timeout=0)
        raise StartupError(f"refusing to run: the TLS 1.3-only self-test failed ({error})") \
            from None

    log.info("listening on %s:%d (mTLS, TLS 1.3 only; self-test: %s)",
             settings.host, port, refusal)
    if driver.name == "none":
        # Asked for explicitly, but never quietly: tasks run with no limits.
        log.warning("cgroup driver: %s", driver.describe())
    else:
        log.info("cgroup driver: %s", driver.describe())
    log.info("limits: %s", settings.limits)
    log.info("state directory %s; stop grace %gs; at most %d streams, %d workers",
             manager.state_dir, settings.stop_grace, settings.max_streams,
             executor._max_workers)

    audit.record("server.start", pid=os.getpid(), address=f"{settings.host}:{port}",
                 tls_self_test=refusal, cgroup_driver=driver.describe(),
                 metrics=(f"{settings.metrics_host}:{metrics_server.server_address[1]}"
                          if metrics_server is not None else None))

    stopping.wait()
    health.enter_graceful_shutdown()  # NOT_SERVING to Watch streams and later Checks
    close_health_watches(health)
    audit.record("server.stop", pid=os.getpid())
    log.info("shutting down: refusing new calls, stopping running tasks")
    stopped = server.stop(grace=settings.stop_grace + SHUTDOWN_MARGIN)
    manager.shutdown()
    stopped.wait(settings.stop_grace + SHUTDOWN_MARGIN + 1)
    executor.shutdown(wait=False)
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    audit.close()
    log.info("stopped")
    return 0


# -- operability: audit trail, metrics, health checking, reflection

AUDIT_LOG = "audit.log"


def observers(settings: Settings, manager):
    """Open the audit log and, if asked for, serve metrics; hang both on the
    manager's task events. Return (audit, metrics or None, metrics HTTP server
    or None); StartupError if either cannot be opened."""
    from taskman.audit import AuditLog

    path = settings.audit_log or os.path.join(manager.state_dir, AUDIT_LOG)
    try:
        audit = AuditLog(path)
    except OSError as error:
        raise StartupError(f"cannot open the audit log {path}: {error.strerror}") from None
    manager.listeners.append(audit.task_event)
    log.info("audit log %s", path)
    if not settings.metrics_address:
        return audit, None, None
    from taskman.metrics import Metrics

    metrics = Metrics()
    try:
        metrics_server = metrics.serve(settings.metrics_host.strip("[]"),
                                       settings.metrics_port)
    except OSError as error:
        audit.close()
        raise StartupError(f"cannot serve metrics on {settings.metrics_address}: "
                           f"{error.strerror}") from None
    manager.listeners.append(metrics.task_event)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host,
             metrics_server.server_address[1])
    return audit, metrics, metrics_server


def add_health_and_reflection(server):
    """Add grpc.health.v1.Health (SERVING for the server and TaskManager) and
    server reflection (listing both and itself); return the health servicer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from taskman.api import task_manager_pb2

    service = task_manager_pb2.DESCRIPTOR.services_by_name["TaskManager"].full_name
    # Blocking Watch: a plain generator the guard can wrap; it holds an
    # executor worker like any stream, and counts against --max-streams.
    servicer = health.HealthServicer(experimental_non_blocking=False)
    for name in (health.OVERALL_HEALTH, service):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)
    return servicer


def close_health_watches(servicer) -> None:
    """End open Health/Watch streams (after NOT_SERVING was sent) so they do not
    hold the shutdown for its whole grace period. grpc_health has no API for
    it: this uses its per-service callbacks, and does nothing if they change."""
    callbacks = getattr(servicer, "_send_response_callbacks", None)
    if not isinstance(callbacks, dict):
        return
    with servicer._lock:
        pending = [callback for group in callbacks.values() for callback in group]
    for callback in pending:
        callback(None)  # None closes a blocking watcher


# -- parsing

def split_address(address: str, option: str = "--server-address"):
    """"host:port" or "[v6]:port" -> (host, port); StartupError if malformed."""
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"invalid {option} {address!r}: expected host:port")
    return host, int(port)


def probe_host(host: str) -> str:
    """Where the self-test connects to reach a server bound to ``host``."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def count(value: str, option: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < minimum:
        raise StartupError(f"{option} must be an integer of at least {minimum}, not {value!r}")
    return number


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(value: str, option: str = "--memory-max") -> int:
    """"512M" -> 536870912; plain numbers are bytes (K, M, G, T: powers of 1024); 0: no limit."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise StartupError(f"invalid {option} {value!r}: expected bytes or a size "
                           "such as 512M")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)


def parse_duration(value: str, option: str) -> float:
    """"7d" -> 604800.0; plain numbers are seconds; 0: forever."""
    match = _DURATION.fullmatch(value.strip())
    if not match:
        raise StartupError(f"invalid {option} {value!r}: expected a duration such as 90s, "
                           "30m, 12h or 7d")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_device(value: str) -> str:
    major, separator, minor = value.partition(":")
    if not (separator and major.isdigit() and minor.isdigit()):
        raise StartupError(f"invalid --io-device {value!r}: expected MAJOR:MINOR such as 8:0")
    return f"{int(major)}:{int(minor)}"
