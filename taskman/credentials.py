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
import time
from typing import Optional, Tuple

import gevent
import grpc

from taskman import pki
from taskman.errors import ConfigError
from taskman.pki.disk import file_stamp, read_file

log = logging.getLogger(__name__)

# How often the server looks at its certificate files, in seconds.
CHECK_INTERVAL = 60.0


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
        return tuple(file_stamp(path) for path in self.paths)

    def _build(self):
        ca_path, cert_path, key_path = self.paths
        ca = read_file(ca_path, "CA certificate")
        cert = read_file(cert_path, "server certificate")
        key = read_file(key_path, "server key")
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


# -- the server's identity as a whole

# How often revocations, certificate files and open streams are looked at;
# renewal (which makes RSA keys) runs every CHECK_INTERVAL.
RECHECK_INTERVAL = 2.0

DEMO_CA_ADVICE = (
    "the CA it trusts is the committed demo CA, whose private key is public (certs/ca.key): "
    "anyone can mint an admin certificate for it")
MAKE_REAL_ONES = (
    "start without certificate options (and without TASKMAN_CERTS_DIR) to generate a "
    "private PKI in <state-dir>/pki, or give --ca-dir, or --ca-cert with --ca-key, for your own CA")


class Peers:
    """pki.PeerCheck kept in step with the CA's revocation list.

    ``identify`` looks at the CRL's stamp first (a stat) so that a revoked
    certificate is refused on its very next call, not at the next tick.
    """

    def __init__(self, ca_path: str, crl_path: str):
        self.ca_path = ca_path
        self.crl_path = crl_path
        self.check = pki.PeerCheck()
        self.last_error: Optional[str] = None
        self._authority = (None, None)  # (stamp, certificate) of ca_path
        self._crl_stamp = None
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the CRL if it changed; True if the revoked set changed."""
        try:
            stamp, authority = self._authority
            if stamp != file_stamp(self.ca_path) or authority is None:
                stamp = file_stamp(self.ca_path)
                authority = pki.load_certificate(self.ca_path, "CA certificate")
                self._authority = (stamp, authority)
            self._crl_stamp = file_stamp(self.crl_path)
            changed = self.check.reload_revocations(self.crl_path, authority)
        except ConfigError as error:
            if str(error) != self.last_error:
                log.warning("revocation list not reloaded: %s", error)
            self.last_error = str(error)
            return False
        self.last_error = None
        if changed:
            log.info("revocation list reloaded: %d certificate(s) revoked", len(self.check.revoked))
        return changed

    def identify(self, pem: bytes) -> str:
        if file_stamp(self.crl_path) != self._crl_stamp:
            self.refresh()
        return self.check.identify(pem)

    def is_revoked(self, pem: bytes) -> bool:
        return self.check.is_revoked(pem)


class ServerIdentity:
    """Credentials, peer check and (when generated) the PKI of one server.

    Without certificate options or TASKMAN_CERTS_DIR the server keeps its own
    PKI in <state-dir>/pki, made on first start (``pki.PKI.open``) and renewed
    here; with them it serves the named files, reloaded when they change.
    """

    def __init__(self, credentials: ReloadingServerCredentials, peers: Peers,
                 directory: Optional["pki.PKI"] = None):
        self.credentials = credentials
        self.peers = peers
        self.pki = directory
        with open(credentials.paths[0], "rb") as file:
            self.demo_ca = pki.trusts_demo_ca(file.read())

    @classmethod
    def open(cls, settings, state_dir: str) -> "ServerIdentity":
        """From taskman.cli.settings.Settings; ConfigError if unusable."""
        from taskman import tls
        from taskman.defaults import CERTS_DIR_VARIABLE

        if settings.ca_key and not settings.ca_cert:
            raise ConfigError("--ca-key needs --ca-cert (the CA certificate it belongs to)")
        static = (settings.server_cert or settings.server_key
                  or (settings.ca_cert and not settings.ca_key) or os.environ.get(CERTS_DIR_VARIABLE))
        if static:
            ca, cert, key = tls.server_files(settings.ca_cert, settings.server_cert,
                                             settings.server_key, state_dir)
            tls.load_pair(ca, cert, key, "server")  # names a bad file in its own words
            crl = os.path.join(os.path.dirname(os.path.abspath(ca)), pki.CA_CRL)
            return cls(ReloadingServerCredentials(ca, cert, key), Peers(ca, crl))
        directory = tls.pki_dir(state_dir)
        created = not os.path.exists(os.path.join(directory, pki.CA_CERT))
        ca_files = (settings.ca_cert, settings.ca_key) if settings.ca_key else None
        opened = pki.PKI.open(directory, extra_names=settings.san, ca_directory=settings.ca_dir,
                              ca_files=ca_files, server_days=settings.server_days,
                              client_days=settings.client_days)
        log.info("%s the PKI in %s", "created" if created else "using", directory)
        renewed = opened.renew()
        if renewed:
            log.info("renewed certificates: %s", ", ".join(renewed))
        return cls(ReloadingServerCredentials.from_pki(directory),
                   Peers(opened.path(pki.CA_CERT), opened.crl_path), opened)

    def renew(self) -> None:
        """Renew what is due (in a thread: an RSA key takes about a second)."""
        if self.pki is None or not self.pki.authority.has_key:
            return
        renewed = gevent.get_hub().threadpool.apply(self.pki.renew)
        if renewed:
            log.info("renewed certificates: %s", ", ".join(renewed))

    def watch(self, on_revocation=None, interval: float = RECHECK_INTERVAL,
              renew_interval: float = CHECK_INTERVAL) -> gevent.Greenlet:
        """Every ``interval``: reload changed files and the CRL, then call
        ``on_revocation(peers)`` (to end revoked streams); every
        ``renew_interval``: renew. Kill the greenlet to stop."""
        def loop():
            next_renewal = 0.0
            while True:
                gevent.sleep(interval)
                try:
                    now = time.monotonic()
                    if now >= next_renewal:
                        next_renewal = now + renew_interval
                        self.renew()
                    self.credentials.check()
                    self.peers.refresh()
                    if on_revocation is not None:
                        on_revocation(self.peers)
                except Exception:
                    log.exception("certificate check failed")
        return gevent.spawn(loop)
