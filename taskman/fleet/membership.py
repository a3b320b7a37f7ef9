"""The server's place in a fleet (--fleet): joining it, the fleet-wide
revocation list, leaving it.

Imported by every server; what it needs of the fleet (and of ``nats``) is
imported only when --fleet is given, so a standalone server needs neither.
"""

import logging

from taskman import private
from taskman.errors import ConfigError, TaskmanError

log = logging.getLogger("taskman.server")


def join(settings, identity, manager, setting_up):
    """With --fleet: join the fleet as a replica and a worker for this host
    (taskman.fleet.node.FleetNode); None without it, and nothing of the
    fleet (nor nats) is imported. ConfigError if the fleet cannot be joined;
    ``setting_up(make)`` turns ``make``'s failures into one (server.py's).
    ``settings``: the server's Settings; ``identity``: its ServerIdentity."""
    if settings.fleet is None:
        return None
    from taskman.fleet import node as fleet_node
    from taskman.fleet.connection import Settings as FleetSettings
    from taskman.fleet.options import node_credentials

    options = settings.fleet
    ca_file, certificate_file, key_file = setting_up(
        lambda: node_credentials(options, identity.pki))
    setting_up(lambda: private.close_to_tasks((key_file,)))
    fleet_settings = FleetSettings(options.servers, options.node, ca_file, certificate_file,
                                   key_file, heartbeat_ttl=options.heartbeat_ttl,
                                   labels=options.labels)
    try:
        node = fleet_node.FleetNode(fleet_settings, manager, options.capacity,
                                    admins=settings.admins,
                                    running_quota=settings.quotas.running_tasks).open()
    except TaskmanError as error:
        raise ConfigError(f"cannot join the fleet: {error}") from None
    log.info("fleet: node %s, capacity %d, NATS %s, heartbeat TTL %gs", options.node,
             options.capacity, ",".join(options.servers), options.heartbeat_ttl)
    return node


def revocations(node, identity):
    """With a fleet: one revocation list for every replica
    (taskman.fleet.revocations), synced once now and then from the identity
    watch; None without a fleet, or if the fleet's list cannot be opened
    (this server's own CRL still holds; the log says why)."""
    if node is None:
        return None
    from taskman.fleet.revocations import FleetRevocations

    try:
        revocations = FleetRevocations(node.connection, identity.peers).open()
    except TaskmanError as error:
        log.error("fleet: the fleet-wide revocation list is not available (%s); "
                  "only this server's CRL is checked", error)
        return None
    revocations.sync()
    return revocations


def leave(node) -> None:
    if node is not None:
        node.close()
