"""taskman-server with extra gRPC server channel arguments, for measuring
one argument on taskman and on the bare server (bench/ceiling.py) alike:

    BENCH_SERVER_ARGS='[["grpc.http2.bdp_probe", 0]]' \\
        python bench/run.py --server bench/args_server.py --only idle ...

$BENCH_SERVER_ARGS is a JSON list of [name, value] pairs, added after the
server's own arguments (gRPC takes the last of a repeated name). Nothing on
disk changes; without the variable this is taskman-server.
"""

import json
import os
import sys

from taskman import tls

# As taskman-server's main does, before grpc loads (docs/design.md).
tls.restrict_to_tls13()
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
from gevent import monkey  # noqa: E402

monkey.patch_all()

import grpc  # noqa: E402

EXTRA = [tuple(pair) for pair in json.loads(os.environ.get("BENCH_SERVER_ARGS") or "[]")]


def _with_extra(server):
    def wrapped(*args, options=None, **kwargs):
        return server(*args, options=[*(options or ()), *EXTRA], **kwargs)
    return wrapped


if __name__ == "__main__":
    grpc.server = _with_extra(grpc.server)
    print(f"args_server: extra server arguments {EXTRA}", file=sys.stderr, flush=True)
    from taskman.cli.server import main

    sys.exit(main(sys.argv[1:]))
