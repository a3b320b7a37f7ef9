"""The fleet's command-line values, checked without importing the fleet.

taskman-server parses its options before gevent patches the standard
library (taskman.cli.server), so this module imports neither nats nor
gevent: only the standard library and the PKI, to issue the node's NATS
client certificate from the server's own CA when none is given.
"""

import dataclasses
import datetime
import os
import urllib.parse
from typing import Dict, Iterable, List, Optional, Tuple

from taskman.errors import ConfigError

SCHEMES = ("nats", "tls")
DEFAULT_CAPACITY = 8
DEFAULT_HEARTBEAT_TTL = 15.0  # longer than a server's reload pause
FLEET_DIRECTORY = "fleet"  # in the PKI directory: the node's NATS client bundle
NODE_CERT = "node.crt"
NODE_KEY = "node.key"


def parse_servers(text: str) -> List[str]:
    """``nats://a:4222,nats://b:4222`` -> the URLs; ConfigError if one is not
    a nats:// or tls:// URL with a host and a port."""
    servers = [part.strip() for part in text.split(",") if part.strip()]
    if not servers:
        raise ConfigError("--fleet needs at least one NATS server URL, e.g. nats://host:4222")
    for server in servers:
        url = urllib.parse.urlsplit(server)
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme not in SCHEMES or not url.hostname or not port:
            raise ConfigError(f"--fleet: {server!r} is not a NATS URL such as nats://host:4222")
    return servers


def check_node_name(name: str) -> str:
    """A node name is a NATS subject token and a KV key: letters, digits,
    '-' and '_' only. ConfigError otherwise."""
    if not name or not all(character.isalnum() or character in "-_" for character in name):
        raise ConfigError(f"--node {name!r}: use letters, digits, '-' and '_' only")
    return name


def parse_labels(pairs: Iterable[str], option: str = "--node-label") -> Dict[str, str]:
    """``["zone=a", "gpu=yes"]`` -> {"zone": "a", "gpu": "yes"}; ConfigError
    if one is not key=value with a non-empty key (a key given twice: the last)."""
    labels = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"{option} {pair!r}: use key=value, e.g. zone=eu-1")
        labels[key.strip()] = value.strip()
    return labels


@dataclasses.dataclass
class FleetOptions:
    """--fleet and its companions, checked; None of them without --fleet."""

    servers: List[str]
    node: str
    capacity: int = DEFAULT_CAPACITY
    ca_file: Optional[str] = None
    certificate_file: Optional[str] = None
    key_file: Optional[str] = None
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    labels: Dict[str, str] = dataclasses.field(default_factory=dict)  # placement

    @classmethod
    def from_command_line(cls, options: dict) -> Optional["FleetOptions"]:
        """From docopt's dict; None without --fleet; ConfigError naming the option."""
        if not options.get("--fleet"):
            for option in ("--node", "--fleet-ca", "--fleet-cert", "--fleet-key",
                           "--node-label"):
                if options.get(option):
                    raise ConfigError(f"{option} needs --fleet")
            return None
        node = options.get("--node")
        if not node:
            raise ConfigError("--fleet needs --node <name>: this server's name in the fleet")
        if bool(options.get("--fleet-cert")) != bool(options.get("--fleet-key")):
            raise ConfigError("--fleet-cert and --fleet-key go together")
        capacity = _number(options.get("--fleet-capacity"), "--fleet-capacity", int, 1, 100000)
        ttl = _number(options.get("--fleet-heartbeat-ttl"), "--fleet-heartbeat-ttl", float,
                      1.0, 3600.0)
        return cls(servers=parse_servers(options["--fleet"]), node=check_node_name(node),
                   capacity=capacity, ca_file=options.get("--fleet-ca"),
                   certificate_file=options.get("--fleet-cert"),
                   key_file=options.get("--fleet-key"), heartbeat_ttl=ttl,
                   labels=parse_labels(options.get("--node-label") or ()))


def _number(value, option: str, kind, minimum, maximum):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not minimum <= number <= maximum:
        raise ConfigError(f"{option} must be a number from {minimum:g} to {maximum:g}, "
                          f"not {value!r}")
    return number


def node_credentials(options: FleetOptions, pki) -> Tuple[str, str, str]:
    """(CA file, certificate file, key file) this server shows the NATS cluster.

    The given files if any; otherwise the server's own PKI (``pki``, a
    taskman.pki.PKI, or None when the server serves fixed files): its CA,
    and a client certificate ``node-<name>`` issued by that CA into
    <pki>/fleet/ (0700, the key 0600), renewed at start once past
    RENEW_AFTER of its lifetime. The whole fleet shares one CA, so the
    NATS cluster trusts every node it issued. ConfigError if there is
    nothing to issue with.
    """
    ca_file = options.ca_file or (pki.path("ca.crt") if pki is not None else None)
    if options.certificate_file:
        if not ca_file:
            raise ConfigError("--fleet-cert needs --fleet-ca (the CA the NATS servers use)")
        return ca_file, options.certificate_file, options.key_file
    if pki is None or not pki.authority.has_key:
        raise ConfigError("--fleet: give --fleet-ca, --fleet-cert and --fleet-key (this "
                          "server's certificates are fixed files, or its CA key is elsewhere, "
                          "so it cannot issue its own NATS client certificate)")
    from taskman import pki as pki_module

    directory = pki.path(FLEET_DIRECTORY)
    certificate_file = os.path.join(directory, NODE_CERT)
    key_file = os.path.join(directory, NODE_KEY)
    if _due(certificate_file, pki.authority.cert_pem):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        bundle = pki.authority.issue(f"node-{options.node}", pki.client_days, pki.key_size)
        pki_module.write_atomically(key_file, bundle.key_pem, 0o600)
        pki_module.write_atomically(certificate_file, bundle.cert_pem, 0o644)
    return ca_file, certificate_file, key_file


def _due(certificate_file: str, ca_pem: bytes) -> bool:
    """True if the node certificate is missing, not signed by the CA, or old."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    from taskman import pki as pki_module

    try:
        certificate = pki_module.load_certificate(certificate_file)
        certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ConfigError, ValueError, TypeError, InvalidSignature):
        return True
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    renew_at = start + (end - start) * pki_module.RENEW_AFTER
    return datetime.datetime.now(datetime.timezone.utc) >= renew_at
