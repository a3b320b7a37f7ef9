"""The fleet end to end: a 3-node NATS cluster and THREE real taskman-servers
(a, b, c) on loopback, each with its own state directory, cgroup root, port
and --node, all trusting one CA (a shared --ca-dir), driven by the real CLI.

The NATS cluster's certificates are issued by that same CA, and each server
authenticates to NATS with the client certificate it issues itself
(node-<name>, <state-dir>/pki/fleet): the deployment docs/fleet.md describes.
"""

import concurrent.futures
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nats_cluster
import pytest
import server_harness
from cryptography import x509

from taskman import pki

CAPACITY = 4
TTL = 15.0  # the default --fleet-heartbeat-ttl
LOST_BOUND = TTL + TTL / 3 + 5.0  # key expiry + one detector round + slack on 2 busy cores
NODES = ("a", "b", "c")
LABELLED = "c"  # the one host with a label (disk=ssd)

# A deterministic output of about 4 MiB, written in bursts, then its own sha256.
CHECKSUMMED = r"""
import hashlib, sys, time
digest = hashlib.sha256()
for number in range(40000):
    line = ("%08d " % number + "0123456789abcdef" * 6 + "\n").encode()
    digest.update(line)
    sys.stdout.buffer.write(line)
    if number % 2000 == 0:
        sys.stdout.flush()
        time.sleep(%(pause)s)
sys.stdout.flush()
print("sha256", digest.hexdigest())
"""


def checksummed(pause: float = 0.02) -> list:
    return ["/usr/bin/python3", "-c", CHECKSUMMED.replace("%(pause)s", str(pause))]


def check_checksummed(output: bytes) -> None:
    """The output is whole: its body hashes to the sha256 the task printed."""
    body, _, last = output.rstrip(b"\n").rpartition(b"\n")
    assert last.startswith(b"sha256 "), output[-200:]
    assert hashlib.sha256(body + b"\n").hexdigest() == last.split()[1].decode()
    assert body.count(b"\n") + 1 == 40000


def reloadable(server) -> list:
    """The server's command run from a script of its own whose interpreter is
    this one, so a reload (which execs the program it was started as) finds
    taskman and its dependencies."""
    script = server.workdir / "taskman-server"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom taskman.cli.server import main\n"
                      f"sys.exit(main())\n")
    script.chmod(0o755)
    return [str(script), *server.command[server.command.index("--server-address"):]]


class Fleet:
    """The cluster and the three servers, and the CLI against any of them."""

    def __init__(self, directory: Path, binary: str):
        self.directory = directory
        self.ca_dir = directory / "ca"
        authority = pki.Authority.create(str(self.ca_dir), "taskman fleet e2e CA", key_size=2048)
        self.cluster = nats_cluster.Cluster(
            directory / "nats", binary, authority=nats_cluster.Authority(
                directory / "nats-pki", authority.key,
                x509.load_pem_x509_certificate(authority.cert_pem)))
        self.servers = {}
        for name in NODES:
            workdir = directory / f"server-{name}"
            state = workdir / "state"
            state.mkdir(parents=True, mode=0o700)
            # Smaller keys than a server makes, for speed; the same CA.
            pki.PKI.open(str(state / "pki"), ca_directory=str(self.ca_dir), key_size=2048)
            labels = ("--node-label", "disk=ssd") if name == LABELLED else ()
            self.servers[name] = server_harness.Server(
                workdir, "--ca-dir", str(self.ca_dir), "--fleet", ",".join(self.cluster.urls),
                "--node", name, "--fleet-capacity", str(CAPACITY), *labels, copy_pki=False)
            self.servers[name].command = reloadable(self.servers[name])
        self.env = {"TASKMAN_CERTS_DIR": str(self.servers["a"].pki_dir)}

    def start(self) -> None:
        self.cluster.start()
        for server in self.servers.values():
            server.start()

    def __enter__(self) -> "Fleet":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        try:
            for server in self.servers.values():
                if server.process and server.process.poll() is None:
                    status = server.stop()
                    assert status == 0, server.log()
        finally:
            self.cluster.stop()

    def restart(self, name: str) -> None:
        server = self.servers[name]
        server.kill()
        if server.log_path.exists():  # keep the earlier life's log
            server.log_path.rename(server.log_path.with_suffix(f".{time.time():.0f}.log"))
        server.start()

    def statuses(self, task_ids, on: str = "a") -> list:
        """The status of each task, from one ListTasks call."""
        listed = self.cli("list", "-o", "json", on=on)
        assert listed.returncode == 0, listed.stderr.decode()
        found = {status["task_id"]: status for status in
                 (json.loads(line) for line in listed.stdout.decode().splitlines() if line)}
        return [found[task_id] for task_id in task_ids]

    def cli(self, command: str, *args: str, on: str = "a", user: str = "client001",
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        return server_harness.taskman(command, *args, "--user-id", user, "--server-address",
                                      self.servers[on].address, timeout=timeout, env=self.env)

    def start_task(self, *command: str, on: str = "a", user: str = "client001") -> str:
        result = self.try_start(*command, on=on, user=user)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().split()[-1]

    def try_start(self, *command: str, on: str = "a", user: str = "client001",
                  options=()) -> subprocess.CompletedProcess:
        return server_harness.taskman("start", "--user-id", user, "--server-address",
                                      self.servers[on].address, *options, "--", *command,
                                      env=self.env)

    def status(self, task_id: str, on: str = "a", user: str = "client001") -> dict:
        result = self.cli("get-status", task_id, "-o", "json", on=on, user=user)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)

    def wait_ended(self, task_id: str, on: str = "a", timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(task_id, on)
            if status["status"] != "JOB_STATUS_STARTED":
                return status
            assert time.monotonic() < deadline, f"task {task_id} still running: {status}"
            time.sleep(0.2)

    def stop_everything(self, timeout: float = 60.0) -> None:
        """Stop every running task (as admin) and wait until none runs, so
        the next test has the fleet's whole capacity."""
        deadline = time.monotonic() + timeout
        while True:
            listed = self.cli("list", "--status", "JOB_STATUS_STARTED", "-o", "json",
                              user="admin")
            assert listed.returncode == 0, listed.stderr.decode()
            running = [json.loads(line)["task_id"] for line in listed.stdout.decode().splitlines()
                       if line.strip()]
            if not running:
                return
            for task_id in running:
                self.cli("stop", task_id, user="admin")
            assert time.monotonic() < deadline, f"still running: {running}"
            time.sleep(0.5)

    def follow(self, task_id: str, on: str, *options: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*server_harness.program("taskman"), "stream", task_id, "--user-id", "client001",
             "--server-address", self.servers[on].address, *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=server_harness.program_env(self.env))

    def hosts_of(self, marker: str) -> dict:
        """node -> how many tasks whose arguments hold ``marker`` it started
        (from each server's audit log, which names the command)."""
        counts = {}
        for name, server in self.servers.items():
            audit = server.state_dir / "audit.log"
            text = audit.read_text(errors="replace") if audit.exists() else ""
            counts[name] = sum(1 for line in text.splitlines()
                               if '"task.started"' in line and marker in line)
        return counts


@pytest.fixture(scope="module")
def fleet(nats_server_binary, tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("e2e"), nats_server_binary) as fleet:
        yield fleet


@pytest.mark.timeout(300)
def test_start_on_a_status_on_b_stream_everywhere_stop_on_c(fleet):
    task_id = fleet.start_task(*checksummed(), on="a")
    assert fleet.status(task_id, on="b")["status"] in ("JOB_STATUS_STARTED",
                                                       "JOB_STATUS_EXITED_OK")
    followers = [fleet.follow(task_id, on) for on in NODES]
    outputs = [follower.communicate(timeout=120) for follower in followers]
    for follower, (output, errors) in zip(followers, outputs, strict=True):
        assert follower.returncode == 0, errors.decode()
        check_checksummed(output)
    assert outputs[0][0] == outputs[1][0] == outputs[2][0]
    final = fleet.wait_ended(task_id, on="c")
    assert (final["status"], final["exit_code"]) == ("JOB_STATUS_EXITED_OK", 0)

    sleeper = fleet.start_task("sleep", "300", on="a")
    assert fleet.status(sleeper, on="b")["status"] == "JOB_STATUS_STARTED"
    stopped = fleet.cli("stop", sleeper, on="c")
    assert stopped.returncode == 0, stopped.stderr.decode()
    final = fleet.wait_ended(sleeper, on="a", timeout=30)
    assert (final["status"], final["termination_source"]) == ("JOB_STATUS_SIGNALED", "user")


@pytest.mark.timeout(120)
def test_a_start_that_requires_labels_runs_only_where_they_are(fleet):
    marker = f"labelled-{uuid.uuid4().hex[:8]}"
    task_ids = []
    for on in NODES:  # asked of every replica; only the labelled host runs them
        started = fleet.try_start("sh", "-c", "echo on ssd", marker, on=on,
                                  options=("--node-label", "disk=ssd"))
        assert started.returncode == 0, started.stderr.decode()
        task_ids.append(started.stdout.decode().split()[-1])
    for task_id in task_ids:
        assert fleet.wait_ended(task_id, on="a")["status"] == "JOB_STATUS_EXITED_OK"
    assert fleet.hosts_of(marker) == {name: 3 if name == LABELLED else 0 for name in NODES}
    nowhere = fleet.try_start("true", on="b", options=("--node-label", "disk=nvme"))
    assert nowhere.returncode == 6, nowhere.stderr.decode()  # RESOURCE_EXHAUSTED


@pytest.mark.timeout(120)
def test_authorization_is_unchanged(fleet):
    task_id = fleet.start_task("sh", "-c", "echo mine", on="b")
    for on in NODES:
        other = fleet.cli("get-status", task_id, on=on, user="client002")
        assert other.returncode == 4, other  # NOT_FOUND, as on one host
        assert fleet.cli("stop", task_id, on=on, user="client002").returncode == 4
        assert fleet.cli("stream", task_id, on=on, user="client002").returncode == 4
        listed = fleet.cli("list", "-o", "json", on=on, user="client002")
        assert task_id not in listed.stdout.decode()
        admin = fleet.cli("get-status", task_id, on=on, user="admin")
        assert admin.returncode == 0, admin.stderr.decode()
        assert task_id in fleet.cli("list", "-o", "json", on=on, user="admin").stdout.decode()
    mine = fleet.cli("stream", task_id, on="c")
    assert mine.stdout == b"mine\n"


@pytest.mark.timeout(120)
def test_stream_views_on_another_replica(fleet):
    result = server_harness.taskman(
        "start", "--separate-streams", "--user-id", "client001", "--server-address",
        fleet.servers["a"].address, "--", "sh", "-c",
        "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done", env=fleet.env)
    assert result.returncode == 0, result.stderr.decode()
    task_id = result.stdout.decode().split()[-1]
    fleet.wait_ended(task_id, on="b")
    errors = fleet.cli("stream", task_id, "--stderr", on="c")
    assert errors.stdout == b"".join(b"err%d\n" % number for number in range(1, 6))
    tail = fleet.cli("stream", task_id, "--stdout", "--tail", "2", on="b")
    assert tail.stdout == b"out4\nout5\n", tail.stderr.decode()
    assert fleet.cli("stream", task_id, "--since", "1h", on="c").returncode == 0


@pytest.mark.timeout(300)
def test_thirty_tasks_spread_over_the_three_hosts(fleet):
    marker = f"spread-{uuid.uuid4().hex[:8]}"

    def start(number: int) -> str:
        return fleet.start_task("sh", "-c", "sleep 3; echo done", marker, on=NODES[number % 3])

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        task_ids = list(pool.map(start, range(30)))
    assert len(set(task_ids)) == 30
    for task_id in task_ids:
        assert fleet.wait_ended(task_id, on="b")["status"] == "JOB_STATUS_EXITED_OK"
    hosts = fleet.hosts_of(marker)
    assert sum(hosts.values()) == 30, hosts
    assert all(hosts[name] > 0 for name in NODES), hosts  # every host ran some
    assert all(count <= 30 for count in hosts.values())


@pytest.mark.timeout(300)
def test_a_reloaded_host_keeps_its_task_and_its_place_in_the_fleet(fleet):
    """SIGHUP on the host running a task: the node does not leave the fleet
    (its task is never reported lost), the new image takes the task back,
    and a follower on another replica gets the whole output."""
    marker = f"reload-{time.time_ns()}"
    task_id = fleet.start_task(*checksummed(pause=0.4), marker, on="a")
    host = next(name for name, count in fleet.hosts_of(marker).items() if count)
    reader = next(name for name in NODES if name != host)
    follower = fleet.follow(task_id, reader)
    time.sleep(1.0)
    fleet.servers[host].process.send_signal(signal.SIGHUP)
    time.sleep(1.5)  # within the reload
    # Never reported lost (UNKNOWN) meanwhile; on a loaded host the task may
    # already have ended (its end is checked below).
    assert fleet.status(task_id, on=reader)["status"] in ("JOB_STATUS_STARTED",
                                                          "JOB_STATUS_EXITED_OK")
    output, errors = follower.communicate(timeout=120)
    assert follower.returncode == 0, errors.decode()
    check_checksummed(output)
    final = fleet.wait_ended(task_id, on=reader)
    assert (final["status"], final["exit_code"]) == ("JOB_STATUS_EXITED_OK", 0), final
    log = fleet.servers[host].log()
    assert fleet.servers[host].process.poll() is None, log
    assert "reloading into" in log and f"task {task_id} taken back" in log, log[-3000:]
    assert "recorded lost" not in log, log[-3000:]
    assert fleet.status(task_id, on=host)["status"] == "JOB_STATUS_EXITED_OK"


@pytest.mark.timeout(300)
def test_a_killed_server_has_its_tasks_reported_lost(fleet):
    marker = f"lost-{uuid.uuid4().hex[:8]}"
    # Exactly the fleet's capacity: every host takes CAPACITY of them.
    fleet.stop_everything()
    task_ids = [fleet.start_task("sh", "-c", "sleep 600", marker, on=NODES[number % 3])
                for number in range(CAPACITY * 3)]
    try:
        check_lost(fleet, marker, task_ids)
    finally:
        if fleet.servers["c"].process.poll() is not None:
            fleet.restart("c")
        fleet.stop_everything()


def check_lost(fleet, marker: str, task_ids: list) -> None:
    assert fleet.hosts_of(marker) == {name: CAPACITY for name in NODES}
    fleet.servers["c"].kill()  # SIGKILL: no clean leave, no last record
    killed = time.monotonic()
    while True:
        statuses = fleet.statuses(task_ids, on="a")
        lost = [status for status in statuses if status["termination_source"] == "lost"]
        if len(lost) == CAPACITY:
            break
        assert time.monotonic() - killed < LOST_BOUND, statuses
        time.sleep(0.5)
    detected = time.monotonic() - killed
    assert all(status["status"] == "JOB_STATUS_UNKNOWN" for status in lost)
    survivors = [status["task_id"] for status in statuses if status not in lost]
    assert all(fleet.status(task_id, on="b")["status"] == "JOB_STATUS_STARTED"
               for task_id in survivors)
    print(f"host killed -> its {CAPACITY} tasks recorded lost after {detected:.1f} s "
          f"(TTL {TTL:g} s)")
    for task_id in survivors:
        assert fleet.cli("stop", task_id, on="b").returncode == 0
    after = f"after-{uuid.uuid4().hex[:8]}"
    new_tasks = [fleet.start_task("sh", "-c", "echo ok", after, on="a") for _ in range(4)]
    for task_id in new_tasks:
        assert fleet.wait_ended(task_id, on="b")["status"] == "JOB_STATUS_EXITED_OK"
    hosts = fleet.hosts_of(after)
    assert hosts["c"] == 0 and hosts["a"] + hosts["b"] == 4, hosts
    # Back with the same state directory and name: its recovery ends the
    # leftovers of its earlier life; the records already say lost.
    fleet.restart("c")
    assert all(fleet.status(status["task_id"], on="c")["termination_source"] == "lost"
               for status in lost)


def output_stream_leader(cluster) -> str:
    """The name of the NATS node leading the output stream (from /jsz)."""
    for node in cluster.nodes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/jsz?"
                                        "accounts=true&streams=true", timeout=5) as reply:
                report = json.load(reply)
        except OSError:
            continue
        for account in report.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == "TASKMAN_OUTPUT":
                    leader = (stream.get("cluster") or {}).get("leader")
                    if leader:
                        return leader
    return cluster.nodes[0].name


@pytest.mark.timeout(300)
def test_a_nats_node_killed_mid_stream(fleet):
    task_id = fleet.start_task(*checksummed(pause=0.15), on="b")
    followers = [fleet.follow(task_id, on) for on in NODES]
    time.sleep(1.0)
    victim = fleet.cluster.node(output_stream_leader(fleet.cluster))
    victim.kill()
    try:
        outputs = [follower.communicate(timeout=180) for follower in followers]
        for follower, (output, errors) in zip(followers, outputs, strict=True):
            assert follower.returncode == 0, errors.decode()
            check_checksummed(output)
        final = fleet.wait_ended(task_id, on="a")
        assert final["status"] == "JOB_STATUS_EXITED_OK", final
    finally:
        victim.start()
        fleet.cluster.wait_healthy(fleet.cluster.nodes)


@pytest.mark.timeout(300)
def test_a_replica_killed_mid_stream(fleet):
    """The CLI retries its one address, then fails with a clear error
    naming the offset it reached; `taskman stream --offset` on another
    replica gives the rest, byte-exact (docs/fleet.md)."""
    marker = f"replica-{uuid.uuid4().hex[:8]}"
    task_id = fleet.start_task(*checksummed(pause=0.5), marker, on="a")
    hosts = fleet.hosts_of(marker)
    host = next(name for name, count in hosts.items() if count)
    replica = next(name for name in NODES if name != host)
    other = next(name for name in NODES if name not in (host, replica))
    follower = fleet.follow(task_id, replica)
    time.sleep(2.0)
    fleet.servers[replica].kill()
    try:
        first, errors = follower.communicate(timeout=120)
        assert follower.returncode == 7, errors.decode()  # UNAVAILABLE
        errors = errors.decode()
        assert "reconnecting from offset" in errors and "cannot reach server" in errors, errors
        assert 0 < len(first), errors
        rest = fleet.follow(task_id, other, "--offset", str(len(first)))
        second, more_errors = rest.communicate(timeout=120)
        assert rest.returncode == 0, more_errors.decode()
        check_checksummed(first + second)
    finally:
        fleet.restart(replica)
    assert re.fullmatch(r"[0-9a-f-]{36}", task_id)
