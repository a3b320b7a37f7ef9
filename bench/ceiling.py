"""The transport ceiling: a bare gRPC server streaming canned 64 KiB messages.

It serves the TaskManager API's StreamTaskOutput with the taskman server's
certificates and mutual TLS, set up under gevent the way taskman-server is
(patch first, then grpc, then ``init_gevent``), but with no task, no output
file and no manager behind it: the request's ``task_id`` is the number of
bytes to send. A follower of taskman can only be as fast as this.

    python bench/ceiling.py PORT
"""

import os
import sys

# The same environment as taskman-server, set before grpc is imported
# (taskman.tls sets these for the real server; see docs/design.md).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", "PSK-AES128-CBC-SHA")

import gevent.monkey  # noqa: I001 (gevent must patch before anything else is imported)

gevent.monkey.patch_all()

import concurrent.futures  # noqa: E402

import grpc  # noqa: E402
import grpc.experimental.gevent  # noqa: E402

grpc.experimental.gevent.init_gevent()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from taskman.api import task_manager_pb2, task_manager_pb2_grpc  # noqa: E402

CHUNK = 64 * 1024
MAX_STREAMS = 4096


class Ceiling(task_manager_pb2_grpc.TaskManagerServicer):
    def __init__(self):
        self.payload = os.urandom(CHUNK)

    def StreamTaskOutput(self, request, context):  # noqa: N802 (gRPC's method name)
        remaining = int(request.task_id)
        payload = self.payload
        while remaining > 0:
            chunk = payload if remaining >= CHUNK else payload[:remaining]
            remaining -= len(chunk)
            yield task_manager_pb2.StreamTaskOutputResponse(output=chunk)


def main() -> None:
    port = int(sys.argv[1])
    common.raise_nofile(65536)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 64),
                         options=[("grpc.so_reuseport", 0)])
    task_manager_pb2_grpc.add_TaskManagerServicer_to_server(Ceiling(), server)
    credentials = grpc.ssl_server_credentials(
        [(common.read_cert("server.key"), common.read_cert("server.crt"))],
        root_certificates=common.read_cert("ca.crt"), require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    print(f"ceiling listening on 127.0.0.1:{port}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
