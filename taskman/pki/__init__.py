"""This host's certificates: a CA, the server's certificate, client bundles.

A PKI directory (0700, keys 0600) holds everything the server and a local CLI
need, in the layout ``TASKMAN_CERTS_DIR`` already expects::

    ca.crt  ca.key  ca.crl       the authority (ca.key only if it lives here)
    server.crt  server.key       for localhost, 127.0.0.1, ::1, the host's name
    <user>.crt  <user>.key       local client bundles (client001, client002, admin)
    issued/<serial>.crt          every certificate issued, for listing and revoking

The authority may instead live in a directory of its own that several
servers share (``ca_directory``), so that every replica accepts the same
client certificates; the PKI directory then holds a copy of ``ca.crt`` only.
Revocations are a real X.509 CRL signed by the CA (``ca.crl``).

Certificates are short-lived and renewed once past ``RENEW_AFTER`` of their
lifetime (``renew``); the server reloads the new files without a restart
(``taskman.credentials``). Names are checked twice with one pattern: when a
certificate is issued and when a peer presents one (``identity_from_pem``).

No grpc here: the library half of identity. RSA-4096 keys cost about a second
each; ``key_size`` exists so that tests can make one real PKI and copy it.
"""

import importlib

from taskman.pki.names import (
    BACKDATE,
    CA_CERT,
    CA_CRL,
    CA_DAYS,
    CA_KEY,
    CLIENT_DAYS,
    DEFAULT_CLIENTS,
    ISSUED,
    KEY_SIZE,
    NAME_PATTERN,
    NAME_RULE,
    RENEW_AFTER,
    RESERVED_NAMES,
    SERVER_CERT,
    SERVER_DAYS,
    SERVER_KEY,
    check_name,
    name_problem,
)

# The rest is imported on first use (PEP 562): importing cryptography costs
# the CLI, which only needs the names above and PeerCheck's module, more than
# grpc itself does.
_HOMES = {
    "taskman.pki.authority": ("Authority", "Bundle", "Issued", "default_server_names"),
    "taskman.pki.directory": ("PKI", "Status", "issued_json", "status_table"),
    "taskman.pki.files": ("DEMO_CA_KEY_SHA256", "check_pair", "load_certificate", "load_key",
                          "new_key", "trusts_demo_ca"),
    "taskman.pki.disk": ("write_atomically",),
    "taskman.pki.identity": ("Peer", "PeerCheck", "identity_from_pem", "peer_from_pem",
                             "read_revoked"),
    "cryptography.hazmat.primitives": ("serialization",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "PKI", "Authority", "Bundle", "Issued", "Status", "Peer", "PeerCheck",
    "default_server_names", "issued_json", "status_table", "check_pair", "load_certificate",
    "load_key", "new_key", "write_atomically", "identity_from_pem", "peer_from_pem",
    "read_revoked", "check_name", "name_problem", "serialization", "trusts_demo_ca", "DEMO_CA_KEY_SHA256",
    "BACKDATE", "CA_CERT", "CA_CRL", "CA_DAYS", "CA_KEY", "CLIENT_DAYS", "DEFAULT_CLIENTS",
    "ISSUED", "KEY_SIZE", "NAME_PATTERN", "NAME_RULE", "RENEW_AFTER", "RESERVED_NAMES",
    "SERVER_CERT", "SERVER_DAYS", "SERVER_KEY",
]
