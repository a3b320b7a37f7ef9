"""Fleet mode: many hosts, one service, on NATS JetStream (docs/fleet.md).

A second backend beside ``taskman.manager.TaskManager``, behind the same
interface (``backend.Backend``) the servicer talks to. Nothing here is
imported by a standalone server: ``nats`` (the ``fleet`` extra) is needed
only when a fleet module is.
"""
