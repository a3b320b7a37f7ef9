"""Server credentials that follow the certificate files without a restart.

grpcio's dynamic server credentials ask a fetch callback for a new
configuration before each TLS handshake (once per accepted connection, never
per call), on a gRPC core thread rather than the gevent hub; handshakes queue
behind it. So the callback here does nothing but compare two integers and
hand back a configuration prepared earlier: no file reads, no gevent calls,
no locks. ``check``, run periodically on the hub, reads the files when their
stamps change, validates the pair and publishes it under a new generation.
Connections already open keep the certificate they were made with; new ones
get the new one (see docs/design.md).

gRPC, handed a key that does not fit its certificate, logs it in the core
and keeps the old configuration without telling Python: hence ``check_pair``
before publishing.
"""

import logging
import os
from typing import Optional, Tuple

import gevent
import grpc

from taskman import pki
from taskman.errors import ConfigError

log = logging.getLogger(__name__)

# How often the server looks at its certificate files, in seconds.
CHECK_INTERVAL = 60.0


def _stamp(path: str):
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror}") from None


class ReloadingServerCredentials:
    """mTLS server credentials (client certificate required) from three files
    that may be replaced at any time, e.g. by ``pki.PKI.renew``.

    ``credentials`` goes to ``server.add_secure_port``. Raises ConfigError
    at construction if the files cannot be used.
    """

    def __init__(self, ca: str, cert: str, key: str):
        self.paths = (ca, cert, key)
        self.generation = 0
        self.last_error: Optional[str] = None
        self._stamps = self._current_stamps()
        initial = self._build()
        # Written by the hub only, as one tuple, so the callback (on another
        # thread) reads a generation and its configuration together.
        self._published: Tuple[int, object] = (0, initial)
        # Written by the callback only.
        self._served = 0
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=True)

    @classmethod
    def from_pki(cls, directory: str) -> "ReloadingServerCredentials":
        """Credentials from a PKI directory's ca.crt, server.crt and server.key."""
        return cls(os.path.join(directory, pki.CA_CERT), os.path.join(directory, pki.SERVER_CERT),
                   os.path.join(directory, pki.SERVER_KEY))

    def _current_stamps(self):
        return tuple(_stamp(path) for path in self.paths)

    def _build(self):
        ca_path, cert_path, key_path = self.paths
        ca = _read(ca_path, "CA certificate")
        cert = _read(cert_path, "server certificate")
        key = _read(key_path, "server key")
        pki.check_pair(cert, key, ca, "server")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self):
        # On a gRPC core thread, before every handshake: keep it trivial.
        generation, configuration = self._published
        if generation == self._served:
            return None
        self._served = generation
        return configuration

    def check(self) -> bool:
        """Publish the files again if they changed and still fit together.

        Returns True when a new configuration was published. A pair that does
        not fit (a renewal half written, a wrong key) is not published; the
        previous one stays, the reason is kept in ``last_error`` and logged,
        and the next check tries again.
        """
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return False
        try:
            configuration = self._build()
        except ConfigError as error:
            if str(error) != self.last_error:
                log.warning("server certificate not reloaded: %s", error)
            self.last_error = str(error)
            return False
        self._stamps = stamps
        self.last_error = None
        self.generation += 1
        self._published = (self.generation, configuration)
        log.info("server certificate reloaded (generation %d)", self.generation)
        return True

    def watch(self, interval: float = CHECK_INTERVAL, before=None) -> gevent.Greenlet:
        """Run ``check`` every ``interval`` seconds in a greenlet; ``before``
        (e.g. ``PKI.renew``) runs first each time. Kill the greenlet to stop."""
        def loop():
            while True:
                gevent.sleep(interval)
                try:
                    if before is not None:
                        before()
                    self.check()
                except Exception:
                    log.exception("certificate check failed")
        return gevent.spawn(loop)
