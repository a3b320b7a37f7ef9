"""The floor of any gRPC command-line client: an interpreter that imports
grpc and makes one mutual-TLS unary call, nothing else.

    python bench/cli_floor.py ADDRESS

Calls GetTaskStatus on bench/ceiling.py at ADDRESS with raw bytes (no
generated modules), as client001, with the run's certificates
($TASKMAN_CERTS_DIR). Exits 0 once the reply came.
"""

import os
import sys

import grpc


def main() -> None:
    directory = os.environ["TASKMAN_CERTS_DIR"]

    def read(name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as handle:
            return handle.read()

    credentials = grpc.ssl_channel_credentials(read("ca.crt"), read("client001.key"),
                                               read("client001.crt"))
    with grpc.secure_channel(sys.argv[1], credentials) as channel:
        channel.unary_unary("/task_manager.TaskManager/GetTaskStatus")(b"", timeout=30)


if __name__ == "__main__":
    main()
