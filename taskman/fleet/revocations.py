"""One revocation list for the whole fleet, kept in the engine.

Each server revokes into its own PKI (``taskman-server pki revoke``: a CRL
signed by the fleet's one CA, taskman.pki). In fleet mode a certificate
revoked on one host must be refused by every replica, so each server
publishes the serial numbers of its local CRL to a KV bucket (key: the
serial in hex, value: who revoked it and when) and merges every serial in
the bucket into its peer check (``pki.PeerCheck.fleet_revoked``), beside its
local CRL.

``sync`` does both; the server calls it from its identity watch (every
``credentials.RECHECK_INTERVAL``, 2 s), so a revocation made on host A is
refused on host B within two such intervals plus one NATS round trip
(REFUSED_WITHIN). A server that cannot reach the fleet keeps the set it last
merged (never forgets a revocation) and says so in its log. Revocations are
never removed from the bucket: a revoked certificate stays revoked until it
expires, and the list is small (one key per revoked certificate).
"""

import json
import logging
import time
from typing import Iterable

import nats.js.api as api
from nats.js.errors import BadRequestError

from taskman.fleet.connection import Connection

log = logging.getLogger("taskman.fleet")

REVOCATIONS_BUCKET = "taskman-revocations"  # serial (hex) -> {"node", "at"}
# Two watch intervals (publish on A, merge on B) and a NATS round trip.
REFUSED_WITHIN = 2 * 2.0 + 1.0


class FleetRevocations:
    """Publishes this server's revocations and merges the fleet's into
    ``peers.check`` (a taskman.credentials.Peers, or anything with a
    ``check``: pki.PeerCheck).

    ``open()`` makes sure the bucket exists (Unavailable if the fleet does
    not answer); ``sync()`` runs one round.
    """

    def __init__(self, connection: Connection, peers):
        self.connection = connection
        self.peers = peers
        self.bucket = None
        self.published: frozenset = frozenset()  # local serials the bucket holds
        self.last_error = None

    def open(self) -> "FleetRevocations":
        self.bucket = self.connection.call(self._open_bucket())
        return self

    async def _open_bucket(self):
        config = api.KeyValueConfig(bucket=REVOCATIONS_BUCKET, history=1,
                                    replicas=self.connection.settings.replicas,
                                    storage=api.StorageType.FILE)
        try:
            return await self.connection.jetstream.create_key_value(config)
        except BadRequestError:  # exists with other settings: use it as it is
            return await self.connection.jetstream.key_value(REVOCATIONS_BUCKET)

    def sync(self) -> bool:
        """Publish local revocations not yet in the bucket, then merge the
        bucket's into the peer check. True when the merged set changed.

        Never raises for the fleet being away: the last merged set stays,
        and the failure is logged once until a round succeeds again.
        """
        try:
            self.publish(self.peers.check.revoked)
            fleet = self.serials()
        except Exception as error:  # any NATS failure: keep refusing what was merged before
            if repr(error) != self.last_error:
                log.warning("fleet revocation list not synced (keeping %d known): %r",
                            len(self.peers.check.fleet_revoked), error)
            self.last_error = repr(error)
            return False
        if self.last_error is not None:
            log.info("fleet revocation list synced again")
            self.last_error = None
        changed = fleet != self.peers.check.fleet_revoked
        if changed:
            self.peers.check.fleet_revoked = fleet
            log.info("fleet revocation list: %d certificate(s) revoked fleet-wide", len(fleet))
        return changed

    def publish(self, serials: Iterable[int]) -> int:
        """Put each serial not published yet; return how many were put."""
        new = frozenset(serials) - self.published
        for serial in sorted(new):
            value = json.dumps({"node": self.connection.settings.node,
                                "at": time.time()}).encode()
            self.connection.call(self.bucket.put(format(serial, "x"), value))
        self.published |= new
        return len(new)

    def serials(self) -> frozenset:
        """Every serial in the bucket, from its stream's subjects (one request)."""
        prefix = f"$KV.{REVOCATIONS_BUCKET}."
        info = self.connection.call(self.connection.jetstream.stream_info(
            f"KV_{REVOCATIONS_BUCKET}", subjects_filter=prefix + ">"))
        found = set()
        for subject in info.state.subjects or {}:
            try:
                found.add(int(subject[len(prefix):], 16))
            except ValueError:  # not ours: ignore rather than refuse everyone
                continue
        return frozenset(found)
