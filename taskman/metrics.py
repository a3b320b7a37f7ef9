"""Operator metrics in the Prometheus text format.

Why prometheus-client rather than a hand-written exposition: it is the
reference implementation of the format (escaping, histogram buckets), and its
default collectors add the process's RSS, open descriptors and CPU time,
which are the first things an operator of a process supervisor watches.
The registry is per server, so tests can run several in one process.
"""

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

from taskman.task import JobStatus, Task

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
               10, 30)


class Metrics:
    """The server's counters and gauges; ``task_event`` is a manager listener."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.tasks_started = Counter("taskman_tasks_started", "Tasks started.", registry=r)
        self.tasks_ended = Counter("taskman_tasks_ended", "Tasks ended, by outcome.",
                                   ["status", "source"], registry=r)
        self.tasks_running = Gauge("taskman_tasks_running", "Tasks running now.", registry=r)
        self.oom_kills = Counter("taskman_oom_kills",
                                 "Tasks ended by the OOM killer inside their memory limit.",
                                 registry=r)
        self.streams_active = Gauge("taskman_streams_active", "Output streams open now.",
                                    registry=r)
        self.streams_refused = Counter("taskman_streams_refused",
                                       "Streams refused at the stream limit.", registry=r)
        self.stream_bytes = Counter("taskman_stream_bytes", "Output bytes sent to followers.",
                                    registry=r)
        self.rpc_duration = Histogram("taskman_rpc_duration_seconds",
                                      "Time to answer a call (streams: until the stream "
                                      "is accepted or refused), by method and status code.",
                                      ["method", "code"], buckets=RPC_BUCKETS, registry=r)
        # (method, code) -> its histogram: ``labels`` checks and locks on
        # every look-up, and every call makes one. Both sets are small and fixed.
        self._rpc_children = {}

    def rpc(self, method: str, code: str) -> Histogram:
        """``rpc_duration``'s histogram for ``method`` and ``code``."""
        child = self._rpc_children.get((method, code))
        if child is None:
            child = self._rpc_children[(method, code)] = self.rpc_duration.labels(method, code)
        return child

    def task_event(self, event: str, task: Task) -> None:
        if event == "started":
            self.tasks_started.inc()
            self.tasks_running.inc()
        elif event == "ended":
            self.tasks_running.dec()
            self.tasks_ended.labels(JobStatus(task.status).name, task.source.value or "none").inc()
            if task.source.value == "oom":
                self.oom_kills.inc()

    def serve(self, host: str, port: int):
        """Serve /metrics over plain HTTP on ``host:port``; return the server.

        Meant for a local address (the default is loopback): the numbers
        carry no task data, but they are not behind mTLS.
        """
        from prometheus_client import start_http_server
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
