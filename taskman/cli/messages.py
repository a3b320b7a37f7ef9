"""What the ``taskman`` CLI says and returns for a failed call: one table from
gRPC status codes to exit codes, one function from a failure to a sentence.

Status codes are handled by name, so this module imports no grpc.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# `taskman run`'s own failures, as `docker run`: never one of the task's codes.
EXIT_TASKMAN_FAILED = 125
# gRPC status code name -> exit code; anything else is EXIT_ERROR.
EXIT_CODES = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 4,
    "UNAUTHENTICATED": 5,
    "PERMISSION_DENIED": 5,
    "RESOURCE_EXHAUSTED": 6,
    "UNAVAILABLE": 7,
    "DEADLINE_EXCEEDED": 8,
}


def exit_code(error) -> int:
    """The exit status for a taskman.client.ClientError."""
    return EXIT_CODES.get(error.code.name, EXIT_ERROR)


def describe_error(error) -> str:
    """One sentence for a failed call, from its status code and the server's message."""
    code, message = error.code.name, error.message.strip()
    if code == "UNAVAILABLE":
        where = ("any of the servers at " if "," in error.address else "server at ") + error.address
        return f"cannot reach {where}: {_unavailable_reason(message)}"
    if code == "DEADLINE_EXCEEDED":
        return f"the server at {error.address} did not answer in time"
    if code == "UNAUTHENTICATED":
        return f"the server refused the credentials: {message}"
    if code == "INTERNAL" or code == "UNKNOWN":
        return f"the server failed: {message or 'no details'}"
    return message or f"the call failed ({code})"


def _unavailable_reason(message: str) -> str:
    lowered = message.lower()
    if "connection refused" in lowered:
        return "connection refused (is taskman-server running there?)"
    if "handshake" in lowered or "ssl" in lowered or "certificate" in lowered:
        return ("the TLS handshake failed (is the certificate signed by the server's CA, "
                "and the address one the server certificate is valid for?)")
    if "dns" in lowered or "resolve" in lowered:
        return "the host name cannot be resolved"
    if "failed to connect" in lowered:
        return "no connection could be made"
    return message or "unavailable"


