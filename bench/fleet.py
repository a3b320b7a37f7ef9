"""Fleet mode beside its baselines, in one run on one machine:

    python bench/fleet.py [--starts N] [--mebibytes M] [--ttl SECONDS]

Starts a real 3-node NATS cluster (JetStream, file storage, mutual TLS,
loopback: tests/fleet/nats_cluster.py) and prints a table:

- start p50, deployed: StartTask of /bin/true through the taskman client
  (its own process, no gevent) against a standalone taskman-server and
  against replica a of three fleet taskman-servers (one process per host,
  as docs/fleet.md deploys them: tests/fleet/test_e2e.py's Fleet), taking
  turns; and on which hosts the fleet's starts ran;
- start p50, in process: TaskManager.start of /bin/true (standalone)
  against FleetBackend.start on a replica sharing its connection with its
  own host's worker (claim, local start: no offer), and on a replica with
  no host of its own, whose host is another connection of this process
  (offer, claim by that worker, local start, answer), taking turns;
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
sys.path[:0] = [str(REPO / "tests" / "fleet"), str(REPO / "tests")]
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


# The real client in a process of its own: standalone and fleet StartTasks
# taking turns (ABBA), after one warm-up each; seconds per call as JSON.
CLIENT = r"""
import json, sys, time
from taskman.client import TaskmanClient
count, user, marker, addresses = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
clients = [TaskmanClient(address, user) for address in addresses]
samples = [[] for _ in clients]
for number in range(count + 1):
    pairs = list(zip(clients, samples))
    for client, kept in (pairs if number % 2 else pairs[::-1]):
        began = time.perf_counter()
        client.start("/bin/true", [marker])
        if number:
            kept.append(time.perf_counter() - began)
print(json.dumps(samples))
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
    """(standalone p50, fleet p50 on the replica's own host, fleet p50 on
    another host) in ms. The three kinds of start take turns, after one
    warm-up each, so all see the same machine: the same nats-servers
    idling, the same heartbeats, the same tasks exiting. The first replica
    shares its connection with its own host's worker, as a fleet server
    does; the second has no host of its own, so its starts are offered to
    the other host."""
    standalone = TaskManager(state_dir=str(directory / "standalone"), stop_grace=1.0)
    own_manager = TaskManager(state_dir=str(directory / "own"), stop_grace=1.0)
    host_manager = TaskManager(state_dir=str(directory / "host"), stop_grace=1.0)
    own_connection = connect(cluster, "bench-own")
    own = Worker(own_connection, own_manager, capacity=count + 2).start()
    worker = Worker(connect(cluster, "bench-host"), host_manager, capacity=count + 2).start()
    here = FleetBackend(own_connection, local=own)
    elsewhere = FleetBackend(connect(cluster, "bench-replica"))
    kinds = ((standalone.start, []), (here.start, []), (elsewhere.start, []))
    for number in range(count + 1):
        for start, samples in kinds:
            began = time.perf_counter()
            start("bench", "/bin/true")
            if number:  # the first of each is a warm-up
                samples.append(time.perf_counter() - began)
    worker.stop()
    own.stop()
    for manager in (host_manager, own_manager, standalone):
        manager.shutdown(timeout=5)
    return tuple(p50_ms(samples) for _, samples in kinds)


def deployed_starts(directory: Path, count: int) -> tuple:
    """(standalone p50, fleet p50, {host: starts}) in ms: StartTask through
    the taskman client against a standalone taskman-server and against
    replica a of three fleet taskman-servers, taking turns."""
    import server_harness
    import test_e2e

    from taskman import pki

    binary = nats_cluster.server_binary()
    with test_e2e.Fleet(directory / "deployed", binary) as fleet:
        state = directory / "standalone-server" / "state"
        state.mkdir(parents=True, mode=0o700)
        pki.PKI.open(str(state / "pki"), ca_directory=str(fleet.ca_dir), key_size=2048)
        standalone = server_harness.Server(directory / "standalone-server", "--ca-dir",
                                           str(fleet.ca_dir), copy_pki=False).start()
        try:
            marker = f"bench-start-{time.time_ns()}"
            result = subprocess.run(
                [sys.executable, "-c", CLIENT, str(count), "client001", marker,
                 standalone.address, fleet.servers["a"].address],
                capture_output=True, text=True, timeout=600,
                env=server_harness.program_env(fleet.env))
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            local, placed = json.loads(result.stdout)
            gevent.sleep(1)  # the audit logs have the last starts
            hosts = fleet.hosts_of(marker)
        finally:
            assert standalone.stop() == 0, standalone.log()[-2000:]
    return p50_ms(local), p50_ms(placed), hosts


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
    parser.add_argument("--only-starts", action="store_true",
                        help="the two start rows alone (development)")
    parser.add_argument("--record", action="store_true",
                        help="also write the rows into docs/benchmarks.md (bench/recorded.py)")
    arguments = parser.parse_args()
    TTL[0] = arguments.ttl
    with tempfile.TemporaryDirectory(prefix="taskman-bench-fleet-") as directory:
        directory = Path(directory)
        served, through, hosts = deployed_starts(directory, arguments.starts)
        deployed_row = ("StartTask /bin/true, p50, real servers and client",
                        f"{through:.1f} ms (fleet replica a; ran on "
                        + ", ".join(f"{name} {count}" for name, count in sorted(hosts.items()))
                        + ")", f"{served:.1f} ms (standalone server)", f"{through / served:.1f}x")
        if not arguments.only_starts:
            print("  ".join(deployed_row), file=sys.stderr)
        cluster = nats_cluster.Cluster(directory / "nats", nats_cluster.server_binary())
        cluster.start()
        try:
            local, here, fleet = starts(cluster, directory, arguments.starts)
            start_rows = [
                ("start /bin/true, p50, in process, on the replica's own host",
                 f"{here:.1f} ms (fleet)", f"{local:.1f} ms (standalone)", f"{here / local:.1f}x"),
                ("start /bin/true, p50, in process, on another host", f"{fleet:.1f} ms (fleet)",
                 f"{local:.1f} ms (standalone)", f"{fleet / local:.1f}x")]
            if arguments.only_starts:
                for row in (deployed_row, *start_rows):
                    print("  ".join(row))
                return 0
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
        deployed_row,
        *start_rows,
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
    if arguments.record:
        record(arguments, served, through, hosts, local, here, fleet, ours, bare, detected,
               (many_seconds, rss_before, rss_after), pause)
    return 0


def record(arguments, served, through, hosts, local, here, fleet, ours, bare, detected, many,
           pause) -> None:
    """The rows as docs/benchmarks.md's fleet block (bench/recorded.py)."""
    import recorded
    from targets import Row, at_least, at_most, format_ratio
    many_seconds, rss_before, rss_after = many
    placed = ", ".join(f"{name} {count}" for name, count in sorted(hosts.items()))
    rows = [
        Row("#18", f"StartTask /bin/true p50, real servers and client (ran on {placed})",
            f"{through:.1f} ms", "a standalone taskman-server, same client and CA",
            f"{served:.1f} ms", format_ratio(through / served), "≤ 3×",
            at_most(through / served, 3.0)),
        Row("#18", "start p50 in process, on the replica's own host", f"{here:.1f} ms",
            "TaskManager.start, standalone", f"{local:.1f} ms", format_ratio(here / local), "",
            None),
        Row("#18", "start p50 in process, on another host", f"{fleet:.1f} ms",
            "TaskManager.start, standalone", f"{local:.1f} ms", format_ratio(fleet / local), "",
            None),
        Row("#18", f"one follower on another replica, {arguments.mebibytes} MiB",
            f"{ours:.1f} MiB/s", "bare nats-py publish and replay, same cluster",
            f"{bare:.1f} MiB/s", format_ratio(ours / bare), "≥ 0.8×", at_least(ours / bare, 0.8)),
        Row("#18", f"{arguments.followers} followers over three replicas, "
            f"{max(1, arguments.mebibytes // 4)} MiB each, byte-exact", f"{many_seconds:.1f} s",
            "RSS before -> at the end", f"{rss_before:.0f} -> {rss_after:.0f} MiB", "", "",
            None),
        Row("#18", "dead host: last heartbeat to its task recorded lost", f"{detected:.1f} s",
            f"TTL {arguments.ttl:g} s, bound", f"{arguments.ttl * 4 / 3:.1f} s", "",
            "within the bound", at_most(detected, arguments.ttl * 4 / 3)),
        Row("#18", "publisher pause, output stream's leader SIGKILLed", f"{pause:.1f} s", "",
            "", "", "", None),
    ]
    command = "python bench/fleet.py " + " ".join(
        f"--{name} {getattr(arguments, name)}" for name in ("starts", "mebibytes", "ttl",
                                                             "followers")) + " --record"
    recorded.record("fleet", recorded.block(
        "fleet", "#18 Fleet: StartTask, followers and failures (bench/fleet.py)", command, rows,
        "A real 3-node NATS cluster (JetStream, file storage, mutual TLS, loopback). The "
        "deployed start row: three fleet taskman-servers (one process per host) and a "
        "standalone one on the same CA, StartTask through the taskman client from a process of "
        "its own against each, taking turns. The in-process rows and the follower rows are "
        "described in bench/fleet.py's docstring."))


if __name__ == "__main__":
    sys.exit(main())
