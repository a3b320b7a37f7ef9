"""The metrics' per-call histogram: one child per (method, code), counted as before."""

from taskman.metrics import Metrics


def test_a_calls_histogram_is_resolved_once_per_method_and_code():
    metrics = Metrics()
    child = metrics.rpc("GetTaskStatus", "OK")
    assert metrics.rpc("GetTaskStatus", "OK") is child
    assert metrics.rpc("GetTaskStatus", "NOT_FOUND") is not child
    child.observe(0.002)
    metrics.rpc("GetTaskStatus", "OK").observe(0.0002)
    count = metrics.registry.get_sample_value(
        "taskman_rpc_duration_seconds_count", {"method": "GetTaskStatus", "code": "OK"})
    under_a_ms = metrics.registry.get_sample_value(
        "taskman_rpc_duration_seconds_bucket",
        {"method": "GetTaskStatus", "code": "OK", "le": "0.001"})
    assert (count, under_a_ms) == (2.0, 1.0)
