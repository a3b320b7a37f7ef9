"""The help texts of the RFD's commands, verbatim (``taskman <command> --help``),
and of ``list``, written in their style.

Strings only: ``taskman.cli.client`` imports them on every run.
"""

START_HELP = """\
Usage:
  taskman start --user-id <user-id> [--server-address <host:port>] [--help] -- <command> [args...]

Description:
  Start a new task by executing the specified command. The --user-id flag is required to identify the client initiating the request.

Arguments:
  <command> [args...]
        The command to execute, followed by any optional arguments. The command should be passed as:
        - A command with space-separated arguments (e.g., ls /myFolder or sh -c 'command with spaces')

        The binary can be a full path or must exist in the system's PATH.
        Example: "ls"

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --help
      Display help information for the start command.

Example:
  $ taskman start --user-id client001 -- ls /myFolder
"""  # noqa: E501 (the RFD's text, verbatim)

GET_STATUS_HELP = """\
Usage:
  taskman get-status <task-id> --user-id <user-id> [--server-address <host:port>] [--help]

Description:
  Retrieve the status of a task using its unique task ID. The command displays details such as whether
  the task is running, start time, process id, and exit code and end time if the process has ended.

Arguments:
  <task-id>             The UUID of the task to query (e.g., a7da14c7-b47a-4535-a263-5bb26e503002)

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --help
      Display help information for the get-status command.

Example:
  $ taskman get-status a7da14c7-b47a-4535-a263-5bb26e503002 --user-id client001
"""

STOP_HELP = """\
Usage:
  taskman stop <task-id> --user-id <user-id> [--server-address <host:port>] [--help]

Description:
  Stop a running task identified by its unique task ID.

Arguments:
  <task-id>
        The unique identifier (UUID) of the task to stop.
        Example: a7da14c7-b47a-4535-a263-5bb26e503002

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --help
      Display help information for the stop command.

Example:
  $ taskman stop a7da14c7-b47a-4535-a263-5bb26e503002 --user-id client001
"""

STREAM_HELP = """\
Usage:
  taskman stream <task-id> --user-id <user-id> [--server-address <host:port>] [--help]

Description:
  Stream real-time output from a running task identified by its unique task ID.
  This command continuously sends the task's stdout and stderr output to your terminal.

Arguments:
  <task-id>
        The unique identifier (UUID) of the task from which to stream output.
        Example: a7da14c7-b47a-4535-a263-5bb26e503002

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --help
      Display help information for the stream command.

Example:
  $ taskman stream a7da14c7-b47a-4535-a263-5bb26e503002 --user-id client001
"""

LIST_HELP = """\
Usage:
  taskman list --user-id <user-id> [--owner <user>] [--status <status>]... [--limit <n>] [--server-address <host:port>] [--help]

Description:
  List your tasks, newest first, in the get-status table style plus the owner
  and the command line. An admin sees every user's tasks; --owner narrows them.
  Finished tasks are kept until the server's retention removes them.

Options:
  --user-id <user-id>
      The user or client ID issuing the request (e.g., client001). This flag is required.
  --owner <user>
      Only this user's tasks (for an admin; everyone else only ever sees their own).
  --status <status>
      Only tasks in this state: started, signaled, exited_ok, exited_error or unknown
      (or the full name, e.g. JOB_STATUS_STARTED). Repeat to allow several.
  --limit <n>
      At most this many tasks (the newest).
  --server-address <host:port>
      The gRPC server address to connect to (e.g., localhost:50051). Defaults to localhost:50051 if not set.
  --help
      Display help information for the list command.

Example:
  $ taskman list --user-id client001 --status started
"""  # noqa: E501
