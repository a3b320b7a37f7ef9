"""Bench client processes, driven by bench/run.py over stdin/stdout JSON lines.

    python bench/worker.py follow TARGET COUNT [--hash]
        Opens COUNT mutual-TLS connections (one channel each, as COUNT separate
        users would), answers {"ready": ...}, then for each {"task_id": ID}
        line follows StreamTaskOutput(ID) on all of them at once and answers
        with per-follower time to first byte, bytes, sha256 and finish time.
        The same code follows taskman-server and the transport ceiling.
    python bench/worker.py starts TARGET SECONDS
        Answers {"ready": ...}, waits for a line, then calls StartTask(/bin/true)
        through taskman.client in a loop for SECONDS and answers with the
        count and the latencies.
    python bench/worker.py stall TARGET
        For each {"task_id": ID} line, opens StreamTaskOutput(ID) and never
        reads from it; answers once the call is open; exits when stdin closes.
    python bench/worker.py idle TARGET COUNT TASK_ID
        Opens COUNT mutual-TLS connections, answers {"connected": ...}; on the
        next line opens StreamTaskOutput(TASK_ID) on every one and waits for
        each stream's first message, answers {"streaming": ...}; then holds
        them all open, reading whatever comes, until stdin closes.

Followers use grpc's asyncio API with raw stubs: one event loop drives all
of a process's followers (a thousand cost one thread, not a thousand), and
the very same code follows taskman-server and the ceiling server.
"""

import asyncio
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import grpc  # noqa: E402

from taskman.api import task_manager_pb2, task_manager_pb2_grpc  # noqa: E402

USER = os.environ.get("BENCH_USER", "client001")
CONNECT_TIMEOUT = float(os.environ.get("BENCH_CONNECT_TIMEOUT", "120"))
STREAM_TIMEOUT = float(os.environ.get("BENCH_STREAM_TIMEOUT", "900"))


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def credentials(user: str = USER) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=common.read_cert("ca.crt"),
        private_key=common.read_cert(f"{user}.key"),
        certificate_chain=common.read_cert(f"{user}.crt"))


CHANNEL_OPTIONS = [
    # One connection per channel: without it grpc shares one subchannel (one
    # TCP+TLS connection) between channels with equal arguments.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def connect(target: str, count: int):
    creds = credentials()
    channels = [grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
                for _ in range(count)]
    began = time.perf_counter()
    # Handshakes in batches: a thousand at once mostly measures the accept queue.
    for first in range(0, count, 100):
        await asyncio.wait_for(
            asyncio.gather(*(channel.channel_ready() for channel in channels[first:first + 100])),
            CONNECT_TIMEOUT)
    return channels, time.perf_counter() - began


async def follow_one(channel, task_id: str, want_hash: bool, go: float) -> dict:
    stub = task_manager_pb2_grpc.TaskManagerStub(channel)
    digest = hashlib.sha256() if want_hash else None
    received = messages = 0
    first = None
    opened = time.perf_counter()
    call = stub.StreamTaskOutput(task_manager_pb2.StreamTaskOutputRequest(task_id=task_id),
                                 timeout=STREAM_TIMEOUT)
    async for message in call:
        data = message.output
        if first is None:
            first = time.perf_counter()
        received += len(data)
        messages += 1
        if digest is not None:
            digest.update(data)
    ended = time.perf_counter()
    return {"bytes": received, "messages": messages, "sha256": digest.hexdigest() if digest else None,
            "ttfb": (first - opened) if first is not None else None,
            "opened": opened - go, "ended": ended - go}


async def follow(target: str, count: int, want_hash: bool) -> None:
    common.raise_nofile(count * 4 + 1024)
    channels, handshakes = await connect(target, count)
    reply({"ready": True, "connect_seconds": handshakes})
    try:
        while True:
            line = await read_line()
            if not line:
                return
            task_id = json.loads(line)["task_id"]
            go = time.perf_counter()
            go_wall = time.time()
            results = await asyncio.gather(
                *(follow_one(channel, task_id, want_hash, go) for channel in channels),
                return_exceptions=True)
            errors = [repr(result) for result in results if isinstance(result, BaseException)]
            reply({"go_wall": go_wall, "errors": errors[:5], "error_count": len(errors),
                   "followers": [result for result in results
                                 if not isinstance(result, BaseException)]})
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def starts(target: str, seconds: float) -> None:
    # The client library, as a user's program would call it; one connection each.
    from taskman.client import TaskmanClient

    with TaskmanClient(target, USER, options=CHANNEL_OPTIONS) as client:
        client.start("/bin/true")  # connects and warms the channel
        reply({"ready": True})
        sys.stdin.readline()
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            client.start("/bin/true")
            latencies.append(time.perf_counter() - began)
        reply({"count": len(latencies), "latencies": latencies})


async def stall(target: str) -> None:
    async with grpc.aio.secure_channel(target, credentials(), options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        calls = []
        while True:
            line = await read_line()
            if not line:
                break
            task_id = json.loads(line)["task_id"]
            call = stub.StreamTaskOutput(
                task_manager_pb2.StreamTaskOutputRequest(task_id=task_id))
            calls.append(call)
            # Headers come with the first message: the stream is open and the
            # server has started sending; from here on nothing is read.
            await asyncio.wait_for(call.initial_metadata(), CONNECT_TIMEOUT)
            reply({"stalled": task_id})
        for call in calls:
            call.cancel()


async def idle(target: str, count: int, task_id: str) -> None:
    common.raise_nofile(count * 4 + 1024)
    channels, seconds = await connect(target, count)
    reply({"connected": count, "seconds": seconds})
    await read_line()
    request = task_manager_pb2.StreamTaskOutputRequest(task_id=task_id)
    began = time.perf_counter()
    calls, results = [], []
    # Streams opened in batches too, each once the last batch has its first
    # message: thousands of calls at once also lose some to the server's
    # queue of calls not yet taken by a handler.
    for first in range(0, count, 100):
        batch = [task_manager_pb2_grpc.TaskManagerStub(channel).StreamTaskOutput(request)
                 for channel in channels[first:first + 100]]
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
        if mode == "follow":
            asyncio.run(follow(target, int(argv[2]), "--hash" in argv))
        elif mode == "starts":
            starts(target, float(argv[2]))
        elif mode == "stall":
            asyncio.run(stall(target))
        elif mode == "idle":
            asyncio.run(idle(target, int(argv[2]), argv[3]))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except Exception as error:  # reported to the harness, which fails the row
        reply({"error": f"{type(error).__name__}: {error}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
