"""Rotate a server certificate under a live gRPC server; print what was seen.

Run by test_pki.py in a subprocess of its own: gRPC's gevent integration has
to be set up before the first gRPC object, in a process patched the way the
server is. Usage: rotation_check.py <pki directory>. Prints one JSON object.
"""

import os
import sys

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
from concurrent import futures  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402
import grpc.experimental.gevent  # noqa: E402
from cryptography import x509  # noqa: E402

from taskman import pki  # noqa: E402
from taskman.credentials import ReloadingServerCredentials  # noqa: E402

grpc.experimental.gevent.init_gevent()

STREAM_LENGTH = 200


def count(request, context):
    for number in range(int(request)):
        yield b"%d\n" % number
        gevent.sleep(0.005)


def served_serial(directory, port):
    """Serial of the certificate a new TLS 1.3 connection is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(directory, pki.CA_CERT))
    context.load_cert_chain(os.path.join(directory, "client001.crt"), os.path.join(directory, "client001.key"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as connection:
            return x509.load_der_x509_certificate(connection.getpeercert(True)).serial_number


def channel(directory, port):
    def read(name):
        with open(os.path.join(directory, name), "rb") as file:
            return file.read()
    credentials = grpc.ssl_channel_credentials(read(pki.CA_CERT), read("client001.key"), read("client001.crt"))
    return grpc.secure_channel(f"localhost:{port}", credentials)


def main(directory):
    local = pki.PKI.open(directory, key_size=2048)
    reloading = ReloadingServerCredentials.from_pki(directory)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Count", {"Count": grpc.unary_stream_rpc_method_handler(count)})])
    port = server.add_secure_port("127.0.0.1:0", reloading.credentials)
    server.start()
    try:
        before = served_serial(directory, port)
        old_channel = channel(directory, port)
        stream = old_channel.unary_stream("/test.Count/Count")(str(STREAM_LENGTH).encode(), timeout=30)
        received = [next(stream) for _ in range(10)]
        unchanged = reloading.check()
        local._renew_server()
        published = reloading.check()
        after = served_serial(directory, port)
        new_channel = channel(directory, port)
        new_call = list(new_channel.unary_stream("/test.Count/Count")(b"3", timeout=10))
        received += list(stream)
        old_call = list(old_channel.unary_stream("/test.Count/Count")(b"2", timeout=10))
        print(json.dumps({
            "before": before, "after": after,
            "file_serial": pki.load_certificate(local.path(pki.SERVER_CERT)).serial_number,
            "check_without_change": unchanged, "check_after_renewal": published,
            "stream_exact": b"".join(received) == b"".join(b"%d\n" % n for n in range(STREAM_LENGTH)),
            "new_call": [item.decode() for item in new_call],
            "old_channel_call": [item.decode() for item in old_call],
        }))
    finally:
        server.stop(0)


if __name__ == "__main__":
    main(sys.argv[1])
