"""The composition root: build, start and stop the gRPC server.

``serve`` wires the parts together in the one order that is safe: the state
directory and the audit log, then the gRPC server (executor, mTLS
credentials, the call guard as interceptor) bound to its port, and only
then the cgroup driver and the TaskManager, so that a port already in use
costs no recovery pass over another server's tasks. Then the servicer,
health checking and reflection, metrics, the start, the TLS 1.3-only
self-test and, on SIGTERM or SIGINT, an orderly shutdown.

Expects the process prepared by taskman.cli.server (TLS restriction in the
environment, gevent's patches, grpc's gevent integration) before it is
imported. Failures to start are raised as ConfigError, one sentence each.
"""

import ipaddress
import logging
import os
import queue
import signal
from concurrent import futures
from typing import TYPE_CHECKING

import gevent
import gevent.event
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskman import private, reload, reload_timeline, reloading, tls, users
from taskman.api import task_manager_pb2, task_manager_pb2_grpc
from taskman.audit import AuditLog
from taskman.cgroups import select_driver
from taskman.credentials import DEMO_CA_ADVICE, MAKE_REAL_ONES, ServerIdentity
from taskman.defaults import default_state_dir, version
from taskman.errors import ConfigError, TaskmanError
from taskman.fleet import membership
from taskman.holdings import Holdings
from taskman.manager import TaskManager
from taskman.output import ensure_directory
from taskman.quotas import Quotas
from taskman.service import CallGuard, GuardInterceptor, TaskManagerServicer, escape

if TYPE_CHECKING:
    from taskman.cli.settings import Settings

SHUTDOWN_MARGIN = 30.0  # seconds in-flight calls get beyond the tasks' stop grace
SERVICE_NAME = task_manager_pb2.DESCRIPTOR.services_by_name["TaskManager"].full_name

log = logging.getLogger("taskman.server")


def serve(settings: "Settings", adopted=None) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit status. On
    SIGHUP, reload in place (taskman.reloading): this returns only if that failed.

    ``adopted``: the tasks a reload handed to this image (taskman.adoption).
    Raises ConfigError when the server cannot start.
    """
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)

    state_dir = _setting_up(lambda: ensure_directory(settings.state_dir or default_state_dir()))
    try:
        identity = ServerIdentity.open(settings, state_dir)
    except OSError as error:
        raise ConfigError(f"cannot set up the certificates: {error.strerror} "
                          f"({error.filename or ''})") from None
    check_demo_ca(identity, settings.host)
    credentials = identity.credentials.credentials
    audit, metrics = open_observers(settings, state_dir)
    guard = CallGuard(settings.max_streams, audit=audit, metrics=metrics, peers=identity.peers,
                      max_health_streams=settings.max_health_streams,
                      call_rate=settings.call_rate, send_rate=settings.send_rate)
    gevent.signal_handler(signal.SIGUSR1, lambda: reopen_audit(audit))
    executor = futures.ThreadPoolExecutor(
        max_workers=TaskManagerServicer.executor_workers(settings.max_streams,
                                                         settings.max_health_streams),
        thread_name_prefix="rpc")
    server = grpc.server(executor, interceptors=[GuardInterceptor(guard)], options=[
        # Without this a second server could bind the same port (gRPC sets
        # SO_REUSEPORT by default) and the two would split the clients.
        ("grpc.so_reuseport", 0),
        # Find clients that vanished without closing, so their streams end.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ])
    port = bind(server, reload.address(settings.address, adopted), credentials)
    if not port:
        audit.close()
        raise ConfigError(f"cannot listen on {settings.address}: the address is in use "
                          "or not available")

    try:
        # The IO limits default to the disks holding / and the task output.
        driver = _setting_up(lambda: select_driver(settings.driver, settings.limits,
                                                   settings.cgroup_root, io_paths=("/", state_dir),
                                                   slice_limits=settings.slice_limits))
        # Tasks run as other uids: the gate, the user map, and files they cannot open.
        task_users = _setting_up(lambda: users.for_server(settings.user_map, settings.uid_range))
        if adopted is None:
            close_to_tasks(settings, state_dir)
        # The one Quotas of this server, the manager's and the servicer's;
        # Holdings counts for it once attached to the manager.
        holdings = Holdings()
        quotas = Quotas(settings.quotas, holdings.measure)
        manager = _setting_up(lambda: TaskManager(
            state_dir=state_dir, driver=driver, stop_grace=settings.stop_grace,
            admins=settings.admins,
            output_max_bytes=settings.task_output_max, retention_age=settings.retention,
            retention_bytes=settings.output_budget, users=task_users, quotas=quotas,
            adopted=adopted))
    except ConfigError:
        audit.close()
        raise
    reload_timeline.mark("manager")
    manager.listeners.append(audit.task_event)
    holdings.attach(manager, settings.admins[0])
    log.info("audit log %s", audit.path)
    try:
        metrics_server = serve_metrics(settings, metrics, manager)
    except ConfigError:
        manager.shutdown(timeout=0)
        audit.close()
        raise
    try:
        node = membership.join(settings, identity, manager, _setting_up)
    except ConfigError:
        manager.shutdown(timeout=0)
        audit.close()
        raise
    backend = node.backend if node is not None else manager  # the fleet's, or this host's
    servicer = TaskManagerServicer(backend, guard=guard, quotas=quotas, users=holdings.users)
    task_manager_pb2_grpc.add_TaskManagerServicer_to_server(servicer, server)
    health_servicer = add_health_and_reflection(server)
    server.start()
    reload_timeline.mark("started")

    try:
        refusal = tls.check_tls13_only(probe_host(settings.host), port)
    except (tls.TLS12Accepted, OSError) as error:
        audit.record("server.refused_to_start", reason=f"TLS 1.3-only self-test failed: {error}")
        server.stop(None)
        manager.shutdown(timeout=0)
        membership.leave(node)
        raise ConfigError(f"refusing to run: the TLS 1.3-only self-test failed ({error})") \
            from None

    log.info("listening on %s:%d (taskman-server %s; mTLS, TLS 1.3 only; self-test: %s)",
             settings.host, port, version(), refusal)
    reload_timeline.mark("listening")
    if adopted is not None:  # the walk (~2,000 files, 10-20 ms) need not delay the first calls
        gevent.spawn_later(RECLOSE_DELAY, close_to_tasks, settings, state_dir, reloaded=True)
    timeline = reload_timeline.summary()
    if timeline:
        log.info("reload timeline, seconds after SIGHUP: %s", timeline)
    revocations = membership.revocations(node, identity)

    def on_revocation(peers) -> None:
        if revocations is not None:  # the fleet's revocations into the peer check first
            revocations.sync()
        guard.end_revoked_streams(peers)

    watcher = identity.watch(on_revocation=on_revocation)
    if driver.name == "none":
        # Asked for explicitly, but never quietly: tasks run with no limits.
        log.warning("cgroup driver: %s", driver.describe())
    else:
        log.info("cgroup driver: %s", driver.describe())
    log.info("limits: %s", settings.limits)
    log.info("quotas per user: %s", settings.quotas)
    log.info("state directory %s; stop grace %gs; at most %d streams, %d workers",
             manager.state_dir, settings.stop_grace, settings.max_streams,
             TaskManagerServicer.executor_workers(settings.max_streams))
    audit.record("server.start", pid=os.getpid(), address=f"{settings.host}:{port}",
                 tls_self_test=refusal, cgroup_driver=driver.describe(),
                 metrics=(f"{settings.metrics_host}:{metrics_server.server_address[1]}"
                          if metrics_server is not None else None))

    reloader = reloading.Reloader(manager, audit, stopping)
    gevent.signal_handler(signal.SIGHUP, reloader.request)
    reload.unblock_signal()  # blocked by the image that exec'd this one
    stopping.wait()
    watcher.kill()
    if reloader.requested:
        reload_timeline.mark("woken")
        health_servicer.end_watches()
        guard.drain("the server is reloading; reconnect")
        if node is not None:  # the next image takes the node's name and tasks back
            node.close(leave=False)
        reloader.reexec(server, manager, port, state_dir)  # returns only if it failed
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING to Watch streams and later Checks
    health_servicer.end_watches()
    audit.record("server.stop", pid=os.getpid())
    log.info("shutting down: refusing new calls, stopping running tasks")
    stopped = server.stop(grace=settings.stop_grace + SHUTDOWN_MARGIN)
    manager.shutdown()
    membership.leave(node)  # after the tasks ended, so their ends are recorded in the fleet
    stopped.wait(settings.stop_grace + SHUTDOWN_MARGIN + 1)
    executor.shutdown(wait=False)
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    audit.close()
    log.info("stopped")
    return 0


def reopen_audit(audit: AuditLog) -> None:
    """SIGUSR1: reopen the audit log (logrotate moved it; SIGHUP is the reload's)."""
    try:
        audit.reopen()
    except OSError as error:
        log.error("cannot reopen the audit log %s: %s; still writing to the old file",
                  audit.path, error.strerror)
        return
    log.info("audit log reopened: %s", audit.path)


class EscapingFormatter(logging.Formatter):
    """One log line per record: control characters in the message (client
    strings: task ids, names, commands) are escaped, so none can end a line
    and forge the next. A traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


def configure_logging(level: int, stream) -> None:
    # Every call logs a line; the format names no thread or process, so
    # logging need not look them up for each record (3-5 us of ~21 us).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _setting_up(make):
    """``make()``, its failure as one ConfigError sentence: "cannot set up tasks: ..."."""
    try:
        return make()
    except TaskmanError as error:
        raise ConfigError(f"cannot set up tasks: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot set up tasks: {error.strerror} "
                          f"({error.filename or ''})") from None


# Seconds after a reload's new image listens before it walks the state
# directory again: the previous image closed every file it made, so the
# walk only repairs what someone changed by hand, and can wait.
RECLOSE_DELAY = 2.0


def close_to_tasks(settings: "Settings", state_dir: str, reloaded: bool = False) -> None:
    """Close the state directory and the keys to tasks (taskman.private);
    ConfigError if that fails. After a reload (``RECLOSE_DELAY`` after it
    listens) only an ERROR line: the previous image served with these files
    as they are, and a new image that refused to start would end every task
    it was handed (a reload's ``--check`` does not walk them:
    taskman.cli.check)."""
    paths = (state_dir, settings.audit_path(state_dir), settings.server_key, settings.ca_key)
    if not reloaded:
        _setting_up(lambda: private.close_to_tasks(paths))
        return
    try:
        private.close_to_tasks(paths)
    except OSError as error:
        log.error("cannot close the server's files to tasks: %s (%s); serving on as the "
                  "previous image did", error.strerror, error.filename or "")


def bind(server, address: str, credentials) -> int:
    """Listen on ``address`` with mTLS; the port, or 0 if it cannot be had."""
    try:
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        return 0


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; False for any other
    name and for the wildcard addresses (they listen on every interface)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_demo_ca(identity: ServerIdentity, host: str) -> None:
    """Refuse the demo CA on a non-loopback address; warn about it on loopback."""
    if not identity.demo_ca:
        return
    if not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host}: {DEMO_CA_ADVICE}; {MAKE_REAL_ONES}")
    log.warning("%s; acceptable on loopback only. %s", DEMO_CA_ADVICE, MAKE_REAL_ONES)


def probe_host(host: str) -> str:
    """Where the self-test connects to reach a server bound to ``host``."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


# -- operability: audit trail, metrics, health checking, reflection

def open_observers(settings: "Settings", state_dir: str):
    """Open the audit log; make the metrics if asked for. Return (audit,
    metrics or None); ConfigError if the audit log cannot be opened."""
    path = settings.audit_path(state_dir)
    try:
        audit = AuditLog(path)
    except OSError as error:
        raise ConfigError(f"cannot open the audit log {path}: {error.strerror}") from None
    if not settings.metrics_address:
        return audit, None
    from taskman.metrics import Metrics

    return audit, Metrics()


def serve_metrics(settings: "Settings", metrics, manager):
    """Serve ``metrics`` over HTTP and hang them on the manager's task events;
    the HTTP server, or None without metrics. ConfigError if it cannot listen."""
    if metrics is None:
        return None
    try:
        metrics_server = metrics.serve(settings.metrics_host.strip("[]"), settings.metrics_port)
    except OSError as error:
        raise ConfigError(f"cannot serve metrics on {settings.metrics_address}: "
                          f"{error.strerror}") from None
    manager.listeners.append(metrics.task_event)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host,
             metrics_server.server_address[1])
    return metrics_server


class HealthServicer(health.HealthServicer):
    """grpc_health's servicer whose blocking Watch streams can be ended.

    Each Watch holds an executor worker until its client leaves; at shutdown
    ``end_watches`` ends them (after NOT_SERVING was sent) so they do not
    hold the server for its whole grace period. Built on the public
    ``send_response_callback`` of grpc_health's Watch.
    """

    def __init__(self):
        # Blocking Watch: a plain generator the guard can wrap and count
        # against --max-streams, like any stream.
        super().__init__(experimental_non_blocking=False)
        self._watches = set()

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is not None:
            return super().Watch(request, context, send_response_callback)
        return self._watch(request, context)

    def _watch(self, request, context):
        responses = queue.Queue()
        self._watches.add(responses)
        try:
            # put(None) from grpc_health (the call ended) or end_watches ends it.
            super().Watch(request, context, send_response_callback=responses.put)
            yield from iter(responses.get, None)
        finally:
            self._watches.discard(responses)

    def end_watches(self) -> None:
        for responses in list(self._watches):
            responses.put(None)


def add_health_and_reflection(server) -> HealthServicer:
    """Add grpc.health.v1.Health (SERVING for the server and TaskManager) and
    server reflection (listing both and itself); return the health servicer."""
    servicer = HealthServicer()
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    return servicer
