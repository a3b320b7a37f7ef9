"""``taskman usage``: a user's usage against each per-user quota of the server.

Not one of the RFD's commands, so its help is ours. An admin may look at
another user (``--user``) or at every user with tasks (``--all``).
"""

import sys

from taskman.cli.formats import format_table, json_line

USAGE_HELP = """\
Usage:
  taskman usage --user-id <user-id> [--user <name> | --all] [--server-address <host:port>] [-o json] [--help]

Description:
  Show your usage of the server against each per-user quota: running tasks,
  open streams, calls in flight, the largest running command line (argument
  bytes per task), finished records kept and output bytes on disk. A limit of
  0 is no limit; OPTION is the server option that sets it. Past a quota the
  server refuses with RESOURCE_EXHAUSTED (exit status 6).

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --user <name>
      Another user's usage (admin only).
  --all
      Every user's usage (admin only).
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  -o json, --output json
      One JSON object per user: {"user": ..., "quotas": [{"name", "used", "limit", "option"}]}.
  --help
      Display help information for the usage command.

Example:
  $ taskman usage --user-id client001
"""  # noqa: E501

COLUMNS = ("QUOTA", "USED", "LIMIT", "OPTION")


def run(client, options: dict, output_format: str, out=None) -> int:
    out = out or sys.stdout
    users = client.usage(user=options.get("--user") or "", all_users=bool(options.get("--all")))
    if output_format == "json":
        for user, quotas in users:
            print(json_line({"user": user, "quotas": [
                {"name": q.name, "used": q.used, "limit": q.limit, "option": q.option}
                for q in quotas]}), file=out)
        return 0
    for index, (user, quotas) in enumerate(users):
        if len(users) > 1:
            print(("\n" if index else "") + f"USER {user}", file=out)
        rows = [(q.name, str(q.used), str(q.limit) if q.limit else "unlimited", q.option)
                for q in quotas]
        print(format_table(COLUMNS, rows), file=out)
    return 0
