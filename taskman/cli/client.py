"""taskman: the command-line client (start, get-status, stop, stream, list,
run, usage, completion).

The help texts of the RFD's commands are the RFD's, verbatim; the options
added since are parsed from ``taskman.cli.usage``. The RFD writes the
command's arguments as ``[args...]``, which docopt would read as a literal
word, so the pattern docopt parses spells it ``[<args>...]``; ``--help`` is
answered before docopt sees the command line, with the RFD's text.

One table (``taskman.cli.messages``) maps gRPC status codes to messages and
exit codes; a local error (bad command line, unusable certificate) is a
ConfigError, exit status 2. Every failure
is one sentence on stderr, never a traceback.
"""

import os
import sys

from taskman.cli.messages import (  # noqa: F401 (EXIT_CODES: the table, importable here too)
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TASKMAN_FAILED,
    EXIT_USAGE,
    describe_error,
    exit_code,
)
from taskman.cli.rfd_help import GET_STATUS_HELP, LIST_HELP, START_HELP, STOP_HELP, STREAM_HELP
from taskman.cli.usage import MAIN_HELP, PATTERNS, RUN_HELP
from taskman.errors import ConfigError

# Everything else is imported by the command that needs it: a CLI start is
# mostly interpreter and grpc start-up, and each module more shows (the
# floor and the measurements are in docs/benchmark-history.md, #20 CLI start).
# Importable from here as before; loaded on first use (PEP 562).
_LAZY = {"OUTPUT_FORMATS": "taskman.cli.formats", "TimestampedLines": "taskman.cli.formats",
         "format_table": "taskman.cli.formats", "format_time": "taskman.cli.formats",
         "json_line": "taskman.cli.formats", "status_object": "taskman.cli.formats"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)



HELP = {"start": START_HELP, "get-status": GET_STATUS_HELP, "stop": STOP_HELP,
        "stream": STREAM_HELP, "list": LIST_HELP, "run": RUN_HELP, "usage": None}


def _help(command: str) -> str:
    if command == "usage":
        from taskman.cli.usage_command import USAGE_HELP

        return USAGE_HELP
    return HELP[command]


class UsageError(ConfigError):
    """The command line cannot be used; like any ConfigError, exit status 2."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except ConfigError as error:  # UsageError, tls.TLSConfigError
        print(f"taskman: {error}", file=sys.stderr)
        # run's own failures must never pass for the task's exit code.
        return EXIT_TASKMAN_FAILED if argv[:1] == ["run"] else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever reads our output (e.g. `| head`) has gone: leave quietly.
        _silence_stdout()
        return EXIT_OK


def _run(argv: list) -> int:
    if not argv:
        print(MAIN_HELP, end="", file=sys.stderr)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help"):
        print(MAIN_HELP, end="")
        return EXIT_OK
    command = argv[0]
    if command == "--version":
        from taskman.defaults import version

        print(f"taskman {version()}")
        return EXIT_OK
    if command == "completion":
        from taskman.cli import completion

        return completion.main(argv[1:], UsageError)
    if command not in HELP:
        raise UsageError(f"unknown command {command!r}: use start, run, get-status, stop, "
                         "stream, list, usage or completion (taskman --help)")
    before_separator = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if "--help" in before_separator or "-h" in before_separator:
        print(_help(command), end="")
        return EXIT_OK
    options = _parse(command, argv)
    output_format = options.get("--output") or "table"
    if output_format not in ("table", "json"):  # taskman.cli.formats.OUTPUT_FORMATS
        raise UsageError(f"unknown --output {output_format!r}: use table or json")

    # Before grpc is imported (by taskman.client): a TLS 1.3-only client, and
    # no gRPC core log lines on the terminal (failures are reported below).
    from taskman import tls

    tls.restrict_to_tls13()
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from taskman import client as client_module

    address = options["--server-address"] or client_module.DEFAULT_ADDRESS
    state_dir = options.get("--state-dir")
    try:
        addresses = client_module.split_addresses(address)
    except ValueError as error:
        raise UsageError(str(error)) from None
    client = client_module.TaskmanClient(",".join(addresses), options["--user-id"],
                                         certs_dir=tls.pki_dir(state_dir) if state_dir else None)
    try:
        with client:
            if command == "run":
                from taskman.cli import run

                return run.run(client, options["<command>"], options["<args>"], output_format,
                               node_labels=_node_labels(options))
            if command == "start":
                return _start(client, options, output_format)
            if command == "get-status":
                return _get_status(client, options["<task-id>"], output_format)
            if command == "stop":
                return _stop(client, options["<task-id>"], output_format, options["--no-wait"])
            if command == "list":
                return _list(client, options, output_format)
            if command == "usage":
                from taskman.cli import usage_command

                return usage_command.run(client, options, output_format)
            return _stream(client, options)
    except client_module.ClientError as error:
        print(f"taskman: {describe_error(error)}", file=sys.stderr)
        return exit_code(error)


def _parse(command: str, argv: list) -> dict:
    import docopt

    try:
        return docopt.docopt(PATTERNS[command], argv=argv, default_help=False)
    except docopt.DocoptExit:
        usage = _help(command).split("\n\n", 1)[0]
        raise UsageError(f"{argv[0]}: missing, unknown or misplaced arguments "
                         f"(see taskman {argv[0]} --help)\n{usage}") from None


# -- the commands

def _start(client, options: dict, output_format: str) -> int:
    task_id = client.start(options["<command>"], options["<args>"],
                           separate_streams=options["--separate-streams"],
                           node_labels=_node_labels(options))
    if output_format == "json":
        from taskman.cli.formats import json_line

        print(json_line({"task_id": task_id}))
    else:
        print("TASK ID\n-------\n" + task_id)
    return EXIT_OK


def _node_labels(options: dict) -> dict:
    """--node-label key=value, repeated, as a dict; UsageError for anything else."""
    labels = {}
    for label in options.get("--node-label") or ():
        key, equals, value = label.partition("=")
        if not equals or not key:
            raise UsageError(f"invalid --node-label {label!r}: expected key=value")
        labels[key] = value
    return labels


STATUS_COLUMNS = ("TASK ID", "START TIME", "PID", "STATUS", "EXIT CODE", "SIGNAL", "SOURCE",
                  "END TIME")


def _get_status(client, task_id: str, output_format: str) -> int:
    from taskman.cli.formats import format_table, format_time, json_line, status_object

    status = client.status(task_id)
    if output_format == "json":
        print(json_line(status_object(status)))
        return EXIT_OK
    row = (status.task_id, format_time(status.start_time), str(status.process_id or "-"),
           status.status, "-" if status.exit_code is None else str(status.exit_code),
           status.termination_signal or "-", status.termination_source or "-",
           format_time(status.end_time))
    print(format_table(STATUS_COLUMNS, [row]))
    if status.output_dropped_bytes:
        # On stderr: stdout stays exactly the RFD's table for scripts.
        print(f"Note: {status.output_note or 'output dropped'} "
              f"({status.output_dropped_bytes} bytes dropped)", file=sys.stderr)
    return EXIT_OK


LIST_COLUMNS = ("TASK ID", "OWNER", "START TIME", "PID", "STATUS", "EXIT CODE", "SIGNAL",
                "SOURCE", "END TIME", "COMMAND")
COMMAND_WIDTH = 60


def _list(client, options: dict, output_format: str) -> int:
    from taskman.cli.formats import format_table, format_time, json_line, status_object

    statuses = [_status_name(value) for value in options["--status"]]
    limit = options["--limit"]
    if limit is not None and (not limit.isdigit() or int(limit) > 2 ** 32 - 1):
        raise UsageError(f"invalid --limit {limit!r}: expected a whole number")
    tasks = client.list(statuses=statuses, owner=options["--owner"] or "",
                        limit=int(limit or 0))
    if output_format == "json":
        for task in tasks:
            print(json_line(status_object(task)))
        return EXIT_OK
    rows = [(task.task_id, task.owner or "-", format_time(task.start_time),
             str(task.process_id or "-"), task.status,
             "-" if task.exit_code is None else str(task.exit_code),
             task.termination_signal or "-", task.termination_source or "-",
             format_time(task.end_time), _command_column(task)) for task in tasks]
    print(format_table(LIST_COLUMNS, rows))
    return EXIT_OK


def _status_name(value: str) -> str:
    from taskman.defaults import JOB_STATUS_NAMES, JOB_STATUS_PREFIX

    name = value.upper()
    if not name.startswith(JOB_STATUS_PREFIX):
        name = JOB_STATUS_PREFIX + name
    if name not in JOB_STATUS_NAMES:
        raise UsageError(f"unknown --status {value!r}: use started, signaled, exited_ok, "
                         "exited_error or unknown")
    return name


def _command_column(task) -> str:
    """The command line, cut to COMMAND_WIDTH characters ending in "..."."""
    from taskman.task import command_line

    text = command_line(task.command, list(task.args), limit=sys.maxsize)
    return text if len(text) <= COMMAND_WIDTH else text[:COMMAND_WIDTH - 3] + "..."


def _stop(client, task_id: str, output_format: str, no_wait: bool = False) -> int:
    from taskman.client import STOP_WAIT  # imported already (grpc with it) by _run

    # The server returns once the signal is sent; wait here (bounded) for the end.
    ended = client.stop(task_id, wait=0 if no_wait else STOP_WAIT)
    if output_format == "json":
        from taskman.cli.formats import json_line, status_object
  # the status once stopped (or as it is, with --no-wait)
        print(json_line(status_object(ended or client.status(task_id))))
    else:
        print(f"Task {task_id} stop request received.")
    return EXIT_OK


def _stream(client, options: dict) -> int:
    """The output as raw bytes on stdout (the RFD's), in the view asked for."""
    from taskman.cli.follow import Follower, parse_count, parse_since
    from taskman.cli.formats import TimestampedLines

    out = sys.stdout.buffer

    def write(data: bytes, moment=None) -> None:
        out.write(data)
        out.flush()

    stamped = TimestampedLines(write) if options["--timestamps"] else None
    selector = "stdout" if options["--stdout"] else "stderr" if options["--stderr"] else "all"
    follower = Follower(
        client, options["<task-id>"],
        (lambda chunk: stamped(chunk.data, chunk.time)) if stamped else
        (lambda chunk: write(chunk.data)),
        offset=parse_count(options["--offset"], "--offset", UsageError), selector=selector,
        tail_lines=parse_count(options["--tail"], "--tail", UsageError),
        since=parse_since(options["--since"], UsageError), follow=not options["--no-follow"])
    follower.run()
    return EXIT_OK


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
