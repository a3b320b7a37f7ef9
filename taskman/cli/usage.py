"""What ``taskman`` accepts: the main help, ``run``'s help, and the patterns
docopt parses each command with.

``taskman <command> --help`` prints the RFD's text for the RFD's commands
(``taskman.cli.client``); the options added since (JSON output, output
views, separate streams) are parsed from the patterns below and described
in MAIN_HELP and docs/cli.md.
"""

SERVER = "[--server-address <host:port>] [--state-dir <dir>]"

COMMON_OPTIONS = """
Options:
  --user-id <user-id>
  --server-address <host:port>
  --state-dir <dir>
  -o <format>, --output <format>
  --owner <user>
  --status <status>
  --limit <n>
  --tail <n>
  --since <time>
  --offset <n>
  --user <name>
  --node-label <label>
"""

PATTERNS = {
    "start": "Usage:\n  taskman start --user-id <user-id> " + SERVER
             + " [--separate-streams] [--node-label <label>]... [-o <format>] [--help]"
               " -- <command> [<args>...]\n",
    "get-status": "Usage:\n  taskman get-status <task-id> --user-id <user-id> " + SERVER
                  + " [-o <format>] [--help]\n",
    "stop": "Usage:\n  taskman stop <task-id> --user-id <user-id> " + SERVER
            + " [--no-wait] [-o <format>] [--help]\n",
    "stream": "Usage:\n  taskman stream <task-id> --user-id <user-id> " + SERVER
              + " [--stdout | --stderr] [--timestamps] [--tail <n>] [--since <time>]"
              " [--no-follow] [--offset <n>] [--help]\n",
    "list": "Usage:\n  taskman list --user-id <user-id> [--owner <user>] [--status <status>]..."
            " [--limit <n>] " + SERVER + " [-o <format>] [--help]\n",
    "usage": "Usage:\n  taskman usage --user-id <user-id> [--user <name> | --all] " + SERVER
             + " [-o <format>] [--help]\n",
    "run": "Usage:\n  taskman run --user-id <user-id> " + SERVER
           + " [--node-label <label>]... [-o <format>] [--help] -- <command> [<args>...]\n",
}
PATTERNS = {command: pattern + COMMON_OPTIONS for command, pattern in PATTERNS.items()}

RUN_HELP = """\
Usage:
  taskman run --user-id <user-id> [--server-address <host:port>] [--node-label <key=value>]... [-o json] [--help] -- <command> [args...]

Description:
  Start a task with its stdout and stderr kept apart, print its stdout to stdout
  and its stderr to stderr as they come, and exit with the task's exit status.
  For pipelines: `taskman run` behaves like the command itself, run remotely.
  Ctrl-C asks the server to stop the task and exits 130 once it has ended; a
  second Ctrl-C leaves at once (the task goes on), printing its id on stderr.
  A lost connection is retried, continuing from the last byte received.

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --node-label <key=value>
      In a fleet, run only on a host with this label (repeat for several: every one).
  -o json, --output json
      After the output, print the task's final status as one JSON object, the last
      line on stderr (stdout carries only the task's stdout).
  --help
      Display help information for the run command.

Exit status:
  the task's exit code; 128+N when a signal N ended it (e.g. 137 for SIGKILL)
  125  taskman itself failed: bad command line, cannot connect, refused, not found...
  130  interrupted (Ctrl-C)

Example:
  $ taskman run --user-id client001 -- sh -c 'echo out; echo err >&2; exit 3'; echo $?
"""  # noqa: E501

MAIN_HELP = """\
Usage:
  taskman start --user-id <user-id> [--server-address <host:port>] [--separate-streams] [--node-label <key=value>]... [-o json] [--help] -- <command> [args...]
  taskman run --user-id <user-id> [--server-address <host:port>] [--node-label <key=value>]... [-o json] [--help] -- <command> [args...]
  taskman get-status <task-id> --user-id <user-id> [--server-address <host:port>] [-o json] [--help]
  taskman stop <task-id> --user-id <user-id> [--server-address <host:port>] [--no-wait] [-o json] [--help]
  taskman stream <task-id> --user-id <user-id> [--server-address <host:port>] [--stdout | --stderr] [--timestamps] [--tail <n>] [--since <time>] [--no-follow] [--offset <n>] [--help]
  taskman list --user-id <user-id> [--owner <user>] [--status <status>]... [--limit <n>] [--server-address <host:port>] [-o json] [--help]
  taskman usage --user-id <user-id> [--user <name> | --all] [--server-address <host:port>] [-o json] [--help]
  taskman completion (bash | zsh)
  taskman --version
  taskman --help

Description:
  Start, inspect, stop and follow tasks on a taskman server over mutual TLS.
  `taskman <command> --help` describes each command. --user-id picks the
  certificate: <user-id>.crt, <user-id>.key and ca.crt from the directory
  $TASKMAN_CERTS_DIR, or else from the server's own PKI on its host
  (<state-dir>/pki; --state-dir names a server's non-default state directory).

Options added to the RFD's commands (docs/cli.md has the details):
  --server-address <host:port>[,<host:port>...]
                           every command: several replicas of one fleet, tried in turn when
                           one is unavailable; stream and run continue on the next from the
                           byte they reached
  --state-dir <dir>        every command: take the certificates from <dir>/pki, the PKI of
                           a server started with --state-dir <dir> (default /var/lib/taskman)
  -o json, --output json   one JSON object (one per line for list) instead of the table
  --separate-streams       start: stdout and stderr on a pipe each, so stream can tell them apart
  --node-label <key=value> start, run: in a fleet, only on a host with this label (repeatable:
                           every one); a standalone server ignores it
  --stdout, --stderr       stream: only that stream (of a task started with separate streams)
  --timestamps             stream: an RFC 3339 time (UTC) before each line
  --tail <n>               stream: start <n> lines before the end of the output there is now
  --since <time>           stream: only output read since an RFC 3339 time or a duration ago (5m)
  --no-follow              stream: print the output there is now and exit 0
  --offset <n>             stream: start at byte <n> of the combined output (to resume)
  --no-wait                stop: return once the server has sent the stop signal, without
                           waiting (up to 40 s) for the task to end

Exit status:
  0    success
  1    the server failed internally, or another error
  2    usage error: bad command line, unknown --user-id, unusable certificate
  3    the server rejected the request as invalid (INVALID_ARGUMENT)
  4    no such task, or not yours (NOT_FOUND)
  5    the server refused the credentials (UNAUTHENTICATED, PERMISSION_DENIED)
  6    a server limit was reached, retry later (RESOURCE_EXHAUSTED)
  7    the server cannot be reached or is shutting down (UNAVAILABLE)
  8    the server did not answer in time (DEADLINE_EXCEEDED)
  130  interrupted (Ctrl-C)
  taskman run exits with the task's status instead, or 125 for its own failures.
"""  # noqa: E501
