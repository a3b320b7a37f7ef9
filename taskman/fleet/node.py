"""What a fleet server adds to a standalone one, in one object the
composition root (taskman/server.py) can build and close.

    node = FleetNode(settings, manager, capacity=8, admins=...).open()
    servicer = TaskManagerServicer(node.backend, ...)   # instead of manager
    ... serve ...
    manager.shutdown()     # tasks end (source server) and are recorded
    node.close()           # then leave the fleet
"""

from typing import Iterable, Optional

from taskman.errors import ConfigError
from taskman.fleet import bridge
from taskman.fleet.backend import ADMIN, FleetBackend
from taskman.fleet.connection import Connection, Settings
from taskman.fleet.options import check_node_name, parse_servers
from taskman.fleet.worker import Worker

__all__ = ["FleetNode", "check_node_name", "parse_servers"]


class FleetNode:
    """The fleet connection, this server's replica backend and its worker."""

    def __init__(self, settings: Settings, manager, capacity: int,
                 admins: Iterable[str] = (ADMIN,), running_quota: int = 0):
        if capacity < 1:
            raise ConfigError("the fleet capacity of a server must be at least 1")
        check_node_name(settings.node)
        self.settings = settings
        self.manager = manager
        self.capacity = capacity
        self.admins = tuple(admins)
        self.running_quota = running_quota  # each user's, fleet-wide (0: none)
        self.connection: Optional[Connection] = None
        self.backend: Optional[FleetBackend] = None
        self.worker: Optional[Worker] = None

    def open(self, timeout: float = 30.0) -> "FleetNode":
        """Join the fleet. Raises Unavailable (no NATS server answered) or
        ConfigError (refused)."""
        self.connection = Connection(bridge.shared(), self.settings).open(timeout)
        self.worker = Worker(self.connection, self.manager, self.capacity).start()
        self.backend = FleetBackend(self.connection, self.admins,
                                    running_quota=self.running_quota, local=self.worker)
        return self

    def close(self, leave: bool = True) -> None:
        """Leave the fleet: no more claims, heartbeat removed, connection closed.

        ``leave=False`` for a reload in place: the heartbeat key is left to
        expire, so the tasks the next image takes back are not recorded lost
        meanwhile (the reload must take less than the heartbeat TTL)."""
        if self.backend is not None:
            self.backend.shutdown()
        if self.worker is not None:
            self.worker.stop(leave=leave)
        if self.connection is not None:
            self.connection.close()
