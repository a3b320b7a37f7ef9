"""Bench client processes of the report's own, driven over stdin/stdout JSON
lines like bench/worker.py's.

    python bench/clients.py idle TARGET COUNT TASK_ID
        Opens COUNT mutual-TLS connections (one channel each), answers
        {"connected": ...}; on the next line opens StreamTaskOutput(TASK_ID)
        on every one and waits for each stream's first message, answers
        {"streaming": ...}; then holds them all open, reading whatever comes,
        until stdin closes.

One asyncio loop drives all of a process's connections (grpc's asyncio API):
a thousand idle followers cost one thread here, not a thousand.
"""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import grpc  # noqa: E402

from taskman.api import task_manager_pb2, task_manager_pb2_grpc  # noqa: E402

USER = os.environ.get("BENCH_USER", "client001")
# One connection per channel: without it grpc shares one subchannel between
# channels with equal arguments.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
BATCH = 100


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def idle(target: str, count: int, task_id: str) -> None:
    common.raise_nofile(count * 4 + 1024)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=common.read_cert("ca.crt"), private_key=common.read_cert(f"{USER}.key"),
        certificate_chain=common.read_cert(f"{USER}.crt"))
    channels = [grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
                for _ in range(count)]
    began = time.perf_counter()
    # Handshakes in batches: thousands at once mostly measure the accept queue.
    for first in range(0, count, BATCH):
        await asyncio.wait_for(asyncio.gather(
            *(channel.channel_ready() for channel in channels[first:first + BATCH])), 300)
    reply({"connected": count, "seconds": time.perf_counter() - began})
    await read_line()
    request = task_manager_pb2.StreamTaskOutputRequest(task_id=task_id)
    began = time.perf_counter()
    calls, results = [], []
    # Streams opened in batches too, each once the last batch has its first
    # message: thousands of calls at once also lose some to the server's
    # queue of calls not yet taken by a handler.
    for first in range(0, count, BATCH):
        batch = [task_manager_pb2_grpc.TaskManagerStub(channel).StreamTaskOutput(request)
                 for channel in channels[first:first + BATCH]]
        calls += batch
        results += await asyncio.gather(*(asyncio.wait_for(call.read(), 60) for call in batch),
                                        return_exceptions=True)
    errors = [repr(result) for result in results if isinstance(result, BaseException)]
    reply({"streaming": count - len(errors), "errors": errors[:3], "seconds": time.perf_counter() - began})
    drains = [asyncio.ensure_future(_drain(call)) for call in calls]
    await read_line()  # stdin closed: the harness is done
    for call in calls:
        call.cancel()
    await asyncio.gather(*drains, return_exceptions=True)
    await asyncio.gather(*(channel.close() for channel in channels))


async def _drain(call) -> None:
    async for _ in call:
        pass


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    mode, target = argv[0], argv[1]
    try:
        if mode == "idle":
            asyncio.run(idle(target, int(argv[2]), argv[3]))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except Exception as error:  # reported to the harness, which fails the section
        reply({"error": f"{type(error).__name__}: {error}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
