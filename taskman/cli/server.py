"""taskman-server: serve the TaskManager API over mutual TLS 1.3.

Order matters and is kept in ``main``: the TLS 1.3 restriction and the fork
setting must be in the environment before grpc is imported, gevent must patch
the standard library before that import, and grpc's gevent integration must
be initialised before any gRPC object exists. So this module imports nothing
of gevent or grpc at the top; taskman.server, which builds the server, is
imported once they are in place.
"""

import os
import sys

from taskman import reload_timeline
from taskman.cgroups import Limits
from taskman.cli import parsed_options
from taskman.cli.settings import Settings, days
from taskman.defaults import DEFAULT_CALL_RATE, DEFAULT_MAX_STREAMS, DEFAULT_SEND_RATE, default_state_dir, version
from taskman.errors import TaskmanError
from taskman.handover import CHECK_VARIABLE as HANDOVER_CHECK_VARIABLE
from taskman.handover import VARIABLE as HANDOVER_VARIABLE
from taskman.pki.names import CLIENT_DAYS, SERVER_DAYS
from taskman.quotas import QuotaLimits

USAGE = """\
Usage:
  taskman-server [--server-address <host:port>] [options] [--io-device <MAJ:MIN>]...
                 [--san <name>]... [--admin <name>]... [--node-label <key=value>]...
  taskman-server pki issue <name> [options]
  taskman-server pki revoke <name-or-serial> [options]
  taskman-server pki list [options]
  taskman-server --help
  taskman-server --version

Description:
  This service manages task lifecycle (start, stop, status) and streams output to clients over a secure mTLS connection.

  Certificates: with no certificate option and no $TASKMAN_CERTS_DIR, the server makes its own
  PKI on first start in <state-dir>/pki (mode 0700): a CA, its own certificate and client
  bundles for client001, client002 and admin, all RSA 4096, renewed before they expire.
  Root's `taskman --user-id <user>` on this host finds them there.

  The pki commands take --state-dir (the server's), --ca-dir, and for issue --days and --out.
  pki issue    a client bundle for a new user (ca.crt, <name>.crt, <name>.key) in --out,
               or in the PKI directory; copy it to the user's machine and set TASKMAN_CERTS_DIR.
  pki revoke   revoke a user's certificates (or one, by serial): refused on their next call,
               their open streams end; no restart.
  pki list     every certificate issued: name, serial, expiry, revoked.

Options:
  --server-address <host:port>
      The address the gRPC server will listen on (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --ca-cert <path>
      CA certificate that client certificates must be signed by. With --ca-key: the CA
      the generated PKI is made with (copied into it). Alone: serve fixed files (with
      --server-cert/--server-key, or server.crt/server.key in $TASKMAN_CERTS_DIR).
  --ca-key <path>
      The private key of --ca-cert, for the generated PKI to issue with.
  --ca-dir <dir>
      A CA directory (ca.crt, ca.key, ca.crl) shared by several servers, so that they
      accept the same client certificates; made by the first server if empty.
  --server-cert <path>
      The server's certificate (PEM), instead of a generated one.
  --server-key <path>
      The server's private key (PEM), instead of a generated one.
  --san <name>
      An extra DNS name or IP address for the generated server certificate (for
      clients on other machines); repeatable. localhost, 127.0.0.1, ::1 and the
      host's name are always in it.
  --server-days <n>
      Lifetime of the generated server certificate, in days [default: {server_days}].
  --client-days <n>
      Lifetime of generated client certificates, in days [default: {client_days}].
  --admin <name>
      Another user who sees and stops everyone's tasks, like admin; repeatable.
  --days <n>
      pki issue: lifetime of the certificate in days (default: --client-days).
  --out <dir>
      pki issue: where to write ca.crt, <name>.crt and <name>.key (made 0700).
  --state-dir <dir>
      Where task output and the generated PKI (pki/) are kept. Defaults to
      /var/lib/taskman for root, ~/.local/state/taskman otherwise.
  --user-map <file>
      Run these identities' tasks as existing accounts: one "identity account" pair
      a line, # comments. Every other identity gets an unprivileged uid of its own.
      An identity mapped to root runs OUTSIDE the sandbox (a WARNING at start; see
      docs/security.md).
  --uid-range <first-last>
      The uids (and gids) allocated to identities, host-wide [default: 70000-99999].
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
  --user-memory-max <size>
      Memory of all of one user's tasks together (their cgroup slice); 0 for no
      limit. Default: half of --root-memory-max.
  --user-pids-max <n>
      Processes and threads of one user's tasks together; 0 for no limit.
      Default: half of --root-pids-max, at most 8192.
  --user-cpu-quota-us <us>
      CPU time per period for one user's tasks together; 0 for no limit (default).
  --user-cpu-period-us <us>
      CPU bandwidth period of each user's slice (default: 1000000).
  --user-io-read-bps <bytes>
      Read bandwidth of one user's tasks together, bytes/s; 0 for none (default).
  --user-io-write-bps <bytes>
      Write bandwidth of one user's tasks together, bytes/s; 0 for none (default).
  --root-memory-max <size>
      Memory of every task together; 0 for no limit. Default: the host's memory
      less 10% (at least 1 GiB), so the host keeps room to run.
  --root-pids-max <n>
      Processes and threads of every task together; 0 for no limit. Default:
      the host's pid_max less a quarter (at least 1024).
  --root-cpu-quota-us <us>
      CPU time per period of every task together; 0 for no limit (default).
  --root-cpu-period-us <us>
      CPU bandwidth period of the root (default: 1000000).
  --root-io-read-bps <bytes>
      Read bandwidth of every task together, bytes/s; 0 for none (default).
  --root-io-write-bps <bytes>
      Write bandwidth of every task together, bytes/s; 0 for none (default).
  --tasks-cpu-weight <n>
      CPU weight of every task together against the server's 100 when both
      want a CPU (1-10000, systemd's CPUWeight scale; 0: the kernel's default).
      Default: 10.
  --stop-grace <seconds>
      Time between SIGTERM and SIGKILL when a task is stopped [default: 10].
  --max-streams <n>
      Concurrent output streams; more are refused with RESOURCE_EXHAUSTED [default: {max_streams}].
  --max-health-streams <n>
      Concurrent health Watch and reflection streams, counted apart from output
      streams so neither kind takes the other's places [default: 16].
  --quota-running-tasks <n>
      Running tasks per user; past it StartTask is refused (RESOURCE_EXHAUSTED).
      Every --quota-* option is per user, and 0 means no limit [default: {running_tasks}].
  --quota-open-streams <n>
      Open output streams per user [default: {open_streams}].
  --quota-calls-in-flight <n>
      Calls one user may have in flight at once [default: {calls_in_flight}].
  --quota-argument-bytes <size>
      Size of one task's command and arguments [default: {argument_bytes}].
  --quota-finished-records <n>
      Finished tasks kept per user; the oldest are forgotten first [default: {finished_records}].
  --quota-output-bytes <size>
      Output per user on disk, running tasks included [default: {output_bytes}].
  --call-rate <n>
      While another user is active, a user whose calls queue behind its own
      gets this many a second (10 saved up); 0 for no pace [default: {call_rate:g}].
  --send-rate <n>
      While another user is active, each user's output messages a second, all
      its streams together; 0 for no pace [default: {send_rate:g}].
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
  --fleet <urls>
      Join a fleet (docs/fleet.md): the NATS servers, comma-separated, e.g.
      tls://nats1:4222,tls://nats2:4222. Needs --node. Without it: a standalone server.
  --node <name>
      This server's name in the fleet: letters, digits, - and _, one per host.
  --fleet-capacity <n>
      Fleet tasks this server runs at once [default: 8].
  --node-label <key=value>
      A label of this host in the fleet, e.g. zone=eu-1; repeatable. A start that
      requires labels (taskman start --node-label) runs only on a host with all of them.
  --fleet-ca <path>
      The CA of the NATS servers' certificates (default: this server's CA).
  --fleet-cert <path>
      This server's client certificate for NATS, with --fleet-key (default: one for
      node-<name>, issued by this server's CA into <state-dir>/pki/fleet).
  --fleet-key <path>
      The private key of --fleet-cert.
  --fleet-heartbeat-ttl <seconds>
      A fleet server silent this long is lost: its tasks are recorded ended, status
      unknown, source lost. Keep it longer than a restart [default: 15].
  --check
      Check the certificates (with the days each has left), the cgroup driver, the state
      directory and the audit log, print one OK or FAIL line each and exit, without serving
      or touching tasks.
  --version
      Print the version of taskman-server and exit (--check prints it first, and
      every response carries it in its taskman-version header).
  --help
      Display help information for the server command.

Environment:
  TASKMAN_CERTS_DIR   serve fixed files from this directory (ca.crt, server.crt, server.key,
                      ca.crl if any) instead of the generated PKI.

Exit status:
  0 stopped cleanly by SIGTERM or SIGINT; 1 could not start or failed; 2 usage error.
  With --check: 0 every check passed; 1 at least one failed.

Examples:
  $ taskman-server --server-address localhost:12345
  $ taskman-server --server-address 0.0.0.0:50051 --san taskman.example.com
  $ taskman-server pki issue alice --out ./alice
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def usage() -> str:
    limits = Limits()
    return USAGE.format(cpu_quota_us=limits.cpu_quota_us, cpu_period_us=limits.cpu_period_us,
                        io_read_bps=limits.io_read_bps, io_write_bps=limits.io_write_bps,
                        pids_max=limits.pids_max, max_streams=DEFAULT_MAX_STREAMS,
                        call_rate=DEFAULT_CALL_RATE, send_rate=DEFAULT_SEND_RATE,
                        server_days=SERVER_DAYS, client_days=CLIENT_DAYS, **quota_defaults())


def quota_defaults() -> dict:
    """QuotaLimits' defaults for the usage text, sizes as 256K or 4G."""
    quotas = QuotaLimits()
    return {"running_tasks": quotas.running_tasks, "open_streams": quotas.open_streams,
            "calls_in_flight": quotas.calls_in_flight,
            "argument_bytes": _size(quotas.argument_bytes),
            "finished_records": quotas.finished_records,
            "output_bytes": _size(quotas.output_bytes)}


def _size(number: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if number and number % unit == 0:
            return f"{number // unit}{suffix}"
    return str(number)


def patch_all() -> None:
    """gevent's monkey.patch_all, without its plugins: for each of its
    events gevent looks up entry points, importing importlib.metadata and
    scanning every installed package's metadata, and a reload's first answer
    waits for the patch. The only plugin gevent itself registers warns about
    a patch of signal without os, which patch_all never is; third-party
    gevent plugins are not run in this server."""
    from gevent import events, monkey

    with_plugins = events.notify_and_call_entry_points
    events.notify_and_call_entry_points = events.notify
    try:
        monkey.patch_all()
    finally:
        events.notify_and_call_entry_points = with_plugins


def main(argv=None) -> int:
    reload_timeline.take()  # a reload's, if one exec'd this image
    reload_timeline.mark("main")
    text = usage()
    arguments = sys.argv[1:] if argv is None else list(argv)
    # A reload's new image: the old image's parse of this same command line.
    options = parsed_options.handed_over(text, arguments)
    if options is None:
        import docopt  # here: a reload's new image does without it

        try:
            options = docopt.docopt(text, argv=arguments, default_help=False)
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

    if options["pki"]:  # imports neither grpc nor gevent
        try:
            return pki_command(options, settings)
        except TaskmanError as error:
            print(f"taskman-server: {error}", file=sys.stderr)
            return EXIT_FAILED

    if settings.check:  # imports neither grpc nor gevent
        from taskman.cli import check

        print(f"taskman-server {version()}")
        for_reload = os.environ.pop(HANDOVER_CHECK_VARIABLE, "") == "1"
        return check.run(settings, for_reload=for_reload)

    parsed_options.pass_on(text, arguments, options)  # for the image a reload execs
    # The order below is the one docs/design.md records; see the module docstring.
    from taskman import tls

    tls.restrict_to_tls13()
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    patch_all()
    reload_timeline.mark("gevent")
    # A reload (SIGHUP) exec'd this image: adopt the running tasks before
    # anything can yield to the loop (docs/design.md, reload).
    adopted = adopt_handed_over_tasks()
    reload_timeline.mark("pids adopted")
    import grpc
    import grpc.experimental.gevent

    grpc.experimental.gevent.init_gevent()
    reload_timeline.mark("grpc")

    from taskman import server
    reload_timeline.mark("server imported")

    server.configure_logging(settings.log_level, sys.stderr)
    try:
        return server.serve(settings, adopted=adopted)
    except BaseException as error:
        if adopted:  # never leave handed-over tasks unsupervised
            from taskman import adoption

            adoption.last_resort(adopted, settings.state_dir or default_state_dir())
        if not isinstance(error, TaskmanError):
            raise
        print(f"taskman-server: {error}", file=sys.stderr)
        return EXIT_FAILED


def adopt_handed_over_tasks():
    """(hand-over, processes) when a reload started this image, else None."""
    path = os.environ.pop(HANDOVER_VARIABLE, None)
    if not path:
        return None
    from taskman import adoption

    return adoption.adopt(path)


def pki_command(options: dict, settings: Settings, out=print) -> int:
    """``taskman-server pki issue|revoke|list`` on the PKI in the state directory
    (or the shared CA of --ca-dir); ConfigError if there is none yet."""
    from taskman import pki, tls
    from taskman.defaults import default_state_dir
    from taskman.errors import ConfigError

    state_dir = settings.state_dir or default_state_dir()
    directory = tls.pki_dir(state_dir)
    if settings.ca_dir:
        authority = pki.Authority(settings.ca_dir)
    elif os.path.exists(os.path.join(directory, pki.CA_CERT)):
        authority = pki.Authority(directory)
    else:
        raise ConfigError(f"no PKI in {directory}: start taskman-server once with this "
                          "--state-dir (it makes one), or give --ca-dir")
    if not authority.has_key and not options["list"]:
        raise ConfigError(f"{authority.directory} holds no CA key: give the shared CA's --ca-dir")
    home = pki.PKI(directory, authority, [], client_days=settings.client_days)
    if options["issue"]:
        lifetime = options["--days"]
        bundle = home.issue(options["<name>"], days=days(lifetime, "--days") if lifetime else None,
                            out=options["--out"] or directory)
        where = options["--out"] or directory
        out(f"issued {bundle.name}: serial {bundle.serial:x}, valid until "
            f"{bundle.not_after:%Y-%m-%d %H:%M} UTC; {where}/{{ca.crt,{bundle.name}.crt,"
            f"{bundle.name}.key}}")
    elif options["revoke"]:
        for entry in home.revoke(options["<name-or-serial>"]):
            out(f"revoked {entry.name}: serial {entry.serial:x}")
    else:
        out(f"{'NAME':<24} {'SERIAL':<40} {'NOT AFTER (UTC)':<17} REVOKED")
        for entry in home.issued():
            out(f"{ascii(entry.name)[1:-1]:<24} {entry.serial:<40x} "
                f"{entry.not_after:%Y-%m-%d %H:%M} {'yes' if entry.revoked else 'no'}")
    return EXIT_OK
