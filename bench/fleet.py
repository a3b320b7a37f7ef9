"""Fleet mode beside its baselines, in one run on one machine:

    python bench/fleet.py [--starts N] [--mebibytes M] [--ttl SECONDS]

Starts a real 3-node NATS cluster (JetStream, file storage, mutual TLS,
loopback: tests/fleet/nats_cluster.py) and prints a table:

- start p50: TaskManager.start of /bin/true (standalone) against
  FleetBackend.start on a replica whose host is another connection (offer,
  claim by a worker, local start, answer), both in this process, taking
  turns;
- one follower: M MiB published by a fleet Publisher and followed live by
  ``output.follow`` on another connection, against bare asyncio nats-py
  (no gevent, another process) publishing the same chunks 16 in flight and
  replaying them with an ordered consumer on a second connection; three
  rounds, taking turns, the median of each;
- 100 followers (--followers) over three replica connections of one
  process, following one M MiB output live: time, byte-exact, and the
  process's RSS before and at the end;
- a dead host: from its last heartbeat to its task recorded lost, at --ttl;
- the publisher's pause when the output stream's leader is killed
  (SIGKILL) mid-publish: the longest gap between two chunks handed over.

Run as root on a host with cgroups, like the server; nats-server from the
fleet-test extra.
"""

import os
import sys

import gevent.monkey  # noqa: I001 (gevent patches first, as in the server)

gevent.monkey.patch_all()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fleet"))
import nats_cluster  # noqa: E402

from taskman.fleet import bridge, output  # noqa: E402
from taskman.fleet.backend import FleetBackend  # noqa: E402
from taskman.fleet.connection import Connection, Settings  # noqa: E402
from taskman.fleet.records import Record  # noqa: E402
from taskman.fleet.worker import Worker  # noqa: E402
from taskman.manager import TaskManager  # noqa: E402
from taskman.output import Chunk  # noqa: E402
from taskman.output_index import Stream  # noqa: E402

CHUNK = 64 * 1024

# Bare nats-py, no gevent, in its own process: the ceiling for one follower.
BARE = r"""
import asyncio, hashlib, json, ssl, sys, time
import nats
from nats.js.api import DeliverPolicy
urls, ca, cert, key, subject, size = sys.argv[1:7]
size = int(size)
def context():
    c = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    c.load_cert_chain(cert, key)
    return c
async def main():
    publisher = await nats.connect(servers=urls.split(","), tls=context())
    follower = await nats.connect(servers=urls.split(","), tls=context())
    js, fjs = publisher.jetstream(), follower.jetstream()
    data = bytes(range(256)) * (65536 // 256)
    started = time.monotonic()
    async def publish():
        pending = []
        for offset in range(0, size, 65536):
            pending.append(await js.publish_async(subject, data, headers={
                "Nats-Msg-Id": subject + str(offset)}, stream="TASKMAN_OUTPUT"))
            if len(pending) >= 16:
                await pending.pop(0)
        for future in pending:
            await future
    async def follow():
        sub = await fjs.subscribe(subject, ordered_consumer=True,
                                  deliver_policy=DeliverPolicy.ALL, stream="TASKMAN_OUTPUT")
        received = 0
        while received < size:
            message = await sub.next_msg(timeout=30)
            received += len(message.data)
        return time.monotonic() - started
    _, elapsed = await asyncio.gather(publish(), follow())
    print(json.dumps({"seconds": elapsed}))
    await publisher.close(); await follower.close()
asyncio.run(main())
"""


TTL = [15.0]  # every connection of a run: the hosts bucket has one TTL


def connect(cluster, node: str) -> Connection:
    ttl = TTL[0]
    certificate, key = cluster.authority.issue(f"bench-{node}")
    return Connection(bridge.shared(), Settings(
        servers=cluster.urls, node=node, ca_file=cluster.authority.ca_file,
        certificate_file=certificate, key_file=key, heartbeat_ttl=ttl)).open()


def p50_ms(samples) -> float:
    return statistics.median(samples) * 1000


def starts(cluster, directory: Path, count: int) -> tuple:
    """(standalone p50, fleet p50) in ms. The two kinds of start alternate,
    after one warm-up each, so both see the same machine: the same
    nats-servers idling, the same heartbeats, the same tasks exiting."""
    standalone = TaskManager(state_dir=str(directory / "standalone"), stop_grace=1.0)
    host_manager = TaskManager(state_dir=str(directory / "host"), stop_grace=1.0)
    worker = Worker(connect(cluster, "bench-host"), host_manager, capacity=count + 2).start()
    replica = FleetBackend(connect(cluster, "bench-replica"))
    local, fleet = [], []
    for number in range(count + 1):
        for start, samples in ((standalone.start, local), (replica.start, fleet)):
            began = time.perf_counter()
            start("bench", "/bin/true")
            if number:  # the first of each is a warm-up
                samples.append(time.perf_counter() - began)
    worker.stop()
    host_manager.shutdown(timeout=5)
    standalone.shutdown(timeout=5)
    return p50_ms(local), p50_ms(fleet)


def one_follower(cluster, mebibytes: int, rounds: int = 3) -> tuple:
    """(fleet MiB/s, bare MiB/s), each the median of ``rounds``, the two
    taking turns so both see the same machine (one run of each varied by
    1.5x here from one run to the next)."""
    size = mebibytes * 1024 * 1024
    publisher_connection = connect(cluster, "bench-publisher")
    follower_connection = connect(cluster, "bench-follower")
    data = bytes(range(256)) * (CHUNK // 256)
    certificate, key = cluster.authority.issue("bench-bare")
    ours, bare = [], []
    for _ in range(rounds):
        task_id = f"bench-{time.time_ns()}"
        began = time.monotonic()

        def publish(task_id):
            publisher = output.Publisher(publisher_connection, task_id)
            publisher.pump(Chunk(offset, Stream.STDOUT, time.time_ns(), data)
                           for offset in range(0, size, CHUNK))

        publishing = gevent.spawn(publish, task_id)
        received = sum(len(chunk.data) for chunk in output.follow(follower_connection, task_id))
        ours.append(mebibytes / (time.monotonic() - began))
        publishing.get()
        assert received == size, (received, size)
        result = subprocess.run(
            [sys.executable, "-c", BARE, ",".join(cluster.urls), cluster.authority.ca_file,
             certificate, key, f"taskman.output.bare-{time.time_ns()}", str(size)],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        bare.append(mebibytes / json.loads(result.stdout)["seconds"])
    return statistics.median(ours), statistics.median(bare)


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def many_followers(cluster, mebibytes: int, count: int) -> tuple:
    """(seconds, RSS before, RSS at the end) for ``count`` followers over
    three connections, every copy byte-exact."""
    size = mebibytes * 1024 * 1024
    publisher_connection = connect(cluster, "bench-many-publisher")
    replicas = [connect(cluster, f"bench-many-{number}") for number in range(3)]
    task_id = f"bench-many-{time.time_ns()}"
    data = os.urandom(size)
    before = rss_mib()
    began = time.monotonic()

    def follow(connection):  # a digest, not a copy: RSS is the fleet's, not the copies'
        digest = hashlib.sha256()
        for chunk in output.follow(connection, task_id):
            digest.update(chunk.data)
        return digest.digest()

    followers = [gevent.spawn(follow, replicas[number % 3]) for number in range(count)]
    publisher = output.Publisher(publisher_connection, task_id)
    publisher.pump(Chunk(offset, Stream.STDOUT, time.time_ns(), data[offset:offset + CHUNK])
                   for offset in range(0, size, CHUNK))
    gevent.joinall(followers, timeout=600, raise_error=True)
    seconds = time.monotonic() - began
    after = rss_mib()
    assert all(follower.value == hashlib.sha256(data).digest() for follower in followers)
    return seconds, before, after


def leader_death_pause(cluster, mebibytes: int) -> float:
    """The longest gap between two chunks handed to the fleet while the
    output stream's leader is killed a quarter of the way in."""
    from taskman.fleet.connection import OUTPUT_STREAM

    size = mebibytes * 1024 * 1024
    host = connect(cluster, "bench-leader-host")
    publisher = output.Publisher(host, f"bench-leader-{time.time_ns()}")
    data = bytes(range(256)) * (CHUNK // 256)
    gaps, victim = [], None
    last = time.monotonic()
    for offset in range(0, size, CHUNK):
        if victim is None and offset >= size // 4:
            leader = host.call(host.jetstream.stream_info(OUTPUT_STREAM)).cluster.leader
            victim = cluster.node(leader)
            victim.kill()
            last = time.monotonic()
        publisher.publish(Chunk(offset, Stream.STDOUT, time.time_ns(), data))
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    publisher.finish()
    gaps.append(time.monotonic() - last)
    victim.restart()
    cluster.wait_healthy(cluster.nodes)
    return max(gaps)


def dead_host(cluster, ttl: float) -> float:
    host = connect(cluster, "bench-doomed")
    watcher = connect(cluster, "bench-watcher")
    from taskman.fleet import liveness
    from taskman.fleet.records import RUNNING, Records

    records = Records(watcher)
    record = Record(id=f"lost-{time.time_ns()}", owner="bench", command="sleep", args=[],
                    phase=RUNNING, host="bench-doomed")
    records.create(record)
    heartbeat = liveness.Heartbeat(host, lambda: {}, lambda: None).start()
    detector = liveness.LostDetector(watcher, records).start()
    gevent.sleep(ttl / 2)
    heartbeat.stop(remove=False)
    last = time.monotonic()  # the last beat was at most ttl/6 before
    while records.get(record.id)[0].phase == RUNNING:
        gevent.sleep(0.05)
    detector.stop()
    return time.monotonic() - last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=50)
    parser.add_argument("--mebibytes", type=int, default=64)
    parser.add_argument("--ttl", type=float, default=15.0)
    parser.add_argument("--followers", type=int, default=100)
    arguments = parser.parse_args()
    TTL[0] = arguments.ttl
    with tempfile.TemporaryDirectory(prefix="taskman-bench-fleet-") as directory:
        directory = Path(directory)
        cluster = nats_cluster.Cluster(directory / "nats", nats_cluster.server_binary())
        cluster.start()
        try:
            local, fleet = starts(cluster, directory, arguments.starts)
            ours, bare = one_follower(cluster, arguments.mebibytes)
            print(f"start p50 {fleet:.1f} ms vs {local:.1f} ms; follower {ours:.1f} vs "
                  f"{bare:.1f} MiB/s", file=sys.stderr)
            detected = dead_host(cluster, arguments.ttl)
            many_seconds, rss_before, rss_after = many_followers(
                cluster, max(1, arguments.mebibytes // 4), arguments.followers)
            pause = leader_death_pause(cluster, arguments.mebibytes)
        finally:
            cluster.stop()
            bridge.shared().close()
    rows = [
        ("start /bin/true, p50", f"{fleet:.1f} ms (fleet)", f"{local:.1f} ms (standalone)",
         f"{fleet / local:.1f}x"),
        (f"one follower on another connection, {arguments.mebibytes} MiB",
         f"{ours:.1f} MiB/s (fleet)", f"{bare:.1f} MiB/s (bare nats-py)", f"{ours / bare:.2f}x"),
        (f"dead host -> task recorded lost (TTL {arguments.ttl:g} s)",
         f"{detected:.1f} s after its last heartbeat", f"bound {arguments.ttl * 4 / 3:.1f} s", ""),
        (f"{arguments.followers} followers over 3 connections, "
         f"{max(1, arguments.mebibytes // 4)} MiB each, byte-exact",
         f"{many_seconds:.1f} s", f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB", ""),
        ("publisher pause, output stream leader SIGKILLed", f"{pause:.1f} s", "", ""),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
