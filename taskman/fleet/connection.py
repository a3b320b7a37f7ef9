"""A fleet server's connection to NATS, and the JetStream layout it relies on.

Every fleet server opens one connection (mutual TLS, the fleet's CA) through
the process's Bridge, and makes sure the buckets and streams exist with the
same settings on every start (creating them is idempotent; a settings change
is an update). The names live here so every module agrees on them.
"""

import asyncio
import dataclasses
import itertools
import logging
import ssl
import time
from typing import Any, Awaitable, Dict, List, Optional

import nats
import nats.js.api as api
from nats.js.errors import BadRequestError, NotFoundError, ServerError, ServiceUnavailableError

from taskman.errors import ConfigError, Unavailable
from taskman.fleet.bridge import Bridge

log = logging.getLogger("taskman.fleet")

TASKS_BUCKET = "taskman-tasks"  # task id -> record (CAS on revision)
HOSTS_BUCKET = "taskman-hosts"  # node name -> heartbeat (expires after the TTL)
DISPATCH_STREAM = "TASKMAN_DISPATCH"  # start requests, a work queue
DISPATCH_SUBJECT = "taskman.dispatch"
OFFER_SUBJECT = "taskman.offer"  # core NATS: a start offered straight to one host
HOSTS_QUEUE = "taskman-hosts"  # the queue group of every host's OFFER_SUBJECT subscription
OUTPUT_STREAM = "TASKMAN_OUTPUT"  # every task's output, file-backed, replayable
OUTPUT_SUBJECTS = "taskman.output.*"
CONTROL_PREFIX = "taskman.control"  # request/reply to one host: stop

CONNECTION_ERRORS = (nats.errors.ConnectionClosedError, nats.errors.NoServersError,
                     nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError)
DEFAULT_TIMEOUT = 10.0  # for one request to the fleet
# Long enough to outlast a stream leader's election after a node dies
# (measured 4.8-6.7 s, docs/fleet.md), so no publish fails on that alone.
PUBLISH_RETRY_WINDOW = 15.0
# What JetStream answers while its cluster is still forming (a meta leader
# just elected, routes still coming up: a CI run saw a stream's creation
# answered "not found" 0.3 s after the election). Making the layout is
# retried on these until open()'s bound, every LAYOUT_RETRY seconds.
LAYOUT_NOT_READY = (NotFoundError, ServiceUnavailableError, ServerError,
                    nats.errors.NoRespondersError, nats.errors.TimeoutError)
LAYOUT_RETRY = 0.5


def output_subject(task_id: str) -> str:
    return f"taskman.output.{task_id}"


def control_subject(node: str, verb: str) -> str:
    return f"{CONTROL_PREFIX}.{node}.{verb}"


@dataclasses.dataclass
class Settings:
    """How to reach the fleet and what this server is in it."""

    servers: List[str]
    node: str
    ca_file: Optional[str] = None
    certificate_file: Optional[str] = None
    key_file: Optional[str] = None
    replicas: int = 3  # of every bucket and stream: a NATS node may die
    heartbeat_ttl: float = 15.0  # a host silent this long is lost
    max_output_bytes: int = 0  # the output stream's size limit (0: none)
    labels: Dict[str, str] = dataclasses.field(default_factory=dict)  # what starts may require

    def tls_context(self) -> Optional[ssl.SSLContext]:
        if not self.ca_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificate_file:
            context.load_cert_chain(self.certificate_file, self.key_file)
        return context


class Connection:
    """The NATS connection, its JetStream context and the opened buckets.

    ``call(coroutine)`` runs NATS work on the bridge with a bound; every
    other fleet module goes through it.
    """

    def __init__(self, bridge: Bridge, settings: Settings,
                 tls: Optional[ssl.SSLContext] = None):
        self.bridge = bridge
        self.settings = settings
        self._tls = tls if tls is not None else settings.tls_context()
        self.client: Any = None
        self.jetstream: Any = None
        self.tasks: Any = None  # KeyValue
        self.hosts: Any = None  # KeyValue

    def call(self, coroutine: Awaitable, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run NATS work on the bridge. A connection that is closed or has no
        server left is Unavailable; NATS's other errors (a key not found, a
        lost CAS) reach the caller as they are, for it to decide."""
        try:
            return self.bridge.call(coroutine, timeout)
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"the fleet connection is down: {error!r}") from error

    def open(self, timeout: float = 30.0) -> "Connection":
        """Connect and make sure the layout exists. Raises Unavailable if
        the fleet cannot be reached within ``timeout``, ConfigError if it
        refuses this server (TLS)."""
        try:
            self.call(self._open(time.monotonic() + timeout - DEFAULT_TIMEOUT), timeout)
        except ssl.SSLError as error:
            raise ConfigError(f"the fleet refused this server's TLS: {error}") from error
        except (OSError, nats.errors.Error) as error:
            raise Unavailable(f"cannot reach the fleet at {', '.join(self.settings.servers)}: "
                              f"{error!r}") from error
        return self

    async def _open(self, retry_until: float) -> None:
        self.client = await nats.connect(
            servers=self.settings.servers, tls=self._tls, name=f"taskman {self.settings.node}",
            max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5,
            allow_reconnect=True, error_cb=self._log_error,
            disconnected_cb=self._log_disconnected, reconnected_cb=self._log_reconnected)
        self.jetstream = self.client.jetstream(timeout=DEFAULT_TIMEOUT)
        for attempt in itertools.count():
            try:
                return await self._layout()
            except LAYOUT_NOT_READY as error:
                if time.monotonic() + LAYOUT_RETRY > retry_until:
                    raise
                if not attempt:
                    log.warning("the fleet's JetStream is not ready (%r); trying again", error)
                await asyncio.sleep(LAYOUT_RETRY)

    async def _layout(self) -> None:
        replicas = self.settings.replicas
        self.tasks = await self._bucket(api.KeyValueConfig(
            bucket=TASKS_BUCKET, history=1, replicas=replicas, storage=api.StorageType.FILE))
        self.hosts = await self._bucket(api.KeyValueConfig(
            bucket=HOSTS_BUCKET, history=1, replicas=replicas, storage=api.StorageType.FILE,
            ttl=self.settings.heartbeat_ttl))
        await self._stream(api.StreamConfig(
            name=DISPATCH_STREAM, subjects=[f"{DISPATCH_SUBJECT}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            num_replicas=replicas, duplicate_window=120.0))
        await self._stream(api.StreamConfig(
            name=OUTPUT_STREAM, subjects=[OUTPUT_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
            num_replicas=replicas, max_bytes=self.settings.max_output_bytes or -1,
            duplicate_window=120.0))

    async def _bucket(self, config: "api.KeyValueConfig") -> Any:
        try:
            return await self.jetstream.create_key_value(config)
        except BadRequestError:  # exists with other settings: take ours
            await self.jetstream.update_stream(api.StreamConfig(
                name=f"KV_{config.bucket}", max_age=config.ttl,
                num_replicas=config.replicas))
            return await self.jetstream.key_value(config.bucket)

    async def _stream(self, config: "api.StreamConfig") -> None:
        try:
            await self.jetstream.add_stream(config)
        except BadRequestError:
            await self.jetstream.update_stream(config)

    async def _log_error(self, error: Exception) -> None:
        log.warning("fleet connection: %r", error)

    async def _log_disconnected(self) -> None:
        log.warning("fleet connection lost; reconnecting")

    async def _log_reconnected(self) -> None:
        log.info("fleet connection back (%s)", self.client.connected_url.netloc)

    def close(self) -> None:
        """Close the connection. Not a drain: every publish that matters was
        acknowledged already, and a drain waits out pending pull requests."""
        if self.client is not None and not self.client.is_closed:
            try:
                self.call(self.client.close(), 5)
            except Exception as error:  # closing anyway: say why it was not clean
                log.warning("fleet connection did not close cleanly: %r", error)
