"""Per-user quotas (taskman/quotas.py): refusals carry one sentence naming
the quota, its value, the user's usage and the option; users do not share."""

import threading

import pytest

from taskman.errors import InvalidArgument, ResourceExhausted
from taskman.quotas import Measured, QuotaLimits, Quotas, Usage

pytestmark = pytest.mark.timeout(10)


def measured_by(table):
    return lambda user: table.get(user, Measured())


def test_running_tasks_past_the_quota_are_refused_with_one_sentence():
    table = {"client001": Measured(running_tasks=20)}
    quotas = Quotas(QuotaLimits(running_tasks=20), measured_by(table))
    with pytest.raises(ResourceExhausted) as refused:
        quotas.check_start("client001", 100)
    assert str(refused.value) == ("quota exceeded: running tasks 20 of 20 for client001; "
                                  "stop or wait for some to end (--quota-running-tasks)")
    quotas.check_start("client002", 100)  # another user is not affected
    table["client001"] = Measured(running_tasks=19)
    quotas.check_start("client001", 100)


def test_argument_bytes_are_checked_before_anything_else():
    quotas = Quotas(QuotaLimits(argument_bytes=1000),
                    measured_by({"alice": Measured(running_tasks=10**6)}))
    with pytest.raises(ResourceExhausted, match=r"argument bytes per task 1001 of 1000 for "
                                                r"alice; .*\(--quota-argument-bytes\)"):
        quotas.check_start("alice", 1001)
    Quotas(QuotaLimits(argument_bytes=1000)).check_start("alice", 1000)


def test_output_on_disk_running_tasks_included_refuses_new_tasks():
    quotas = Quotas(QuotaLimits(output_bytes=1 << 20),
                    measured_by({"alice": Measured(output_bytes=1 << 20)}))
    with pytest.raises(ResourceExhausted, match=r"output bytes on disk 1048576 of 1048576 for "
                                                r"alice; .*\(--quota-output-bytes\)"):
        quotas.check_start("alice", 10)
    assert quotas.output_exceeded("alice", 1 << 20)
    assert not quotas.output_exceeded("alice", (1 << 20) - 1)


def test_streams_are_counted_per_user_and_released():
    quotas = Quotas(QuotaLimits(open_streams=2))
    with quotas.acquire_stream("alice"), quotas.acquire_stream("alice"):
        with pytest.raises(ResourceExhausted) as refused:
            with quotas.acquire_stream("alice"):
                pass
        assert str(refused.value) == ("quota exceeded: open streams 2 of 2 for alice; close one "
                                      "of your other streams first (--quota-open-streams)")
        with quotas.acquire_stream("bob"):  # bob has his own
            pass
        assert ("open streams", 2, 2, "--quota-open-streams") in quotas.usage("alice")
    with quotas.acquire_stream("alice"):  # released, also after the refusal
        assert ("open streams", 1, 2, "--quota-open-streams") in quotas.usage("alice")
    assert not quotas._streams


def test_a_call_that_raises_still_releases_its_slot():
    quotas = Quotas(QuotaLimits(calls_in_flight=1))
    with pytest.raises(RuntimeError):
        with quotas.acquire_call("alice"):
            raise RuntimeError("the call failed")
    with quotas.acquire_call("alice"):
        with pytest.raises(ResourceExhausted, match=r"calls in flight 1 of 1 for alice"):
            with quotas.acquire_call("alice"):
                pass


def test_concurrent_acquisitions_never_exceed_the_quota():
    quotas = Quotas(QuotaLimits(calls_in_flight=5))
    inside, most, refused = [0], [0], []
    lock, go = threading.Lock(), threading.Event()

    def call():
        go.wait()
        try:
            with quotas.acquire_call("alice"):
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                threading.Event().wait(0.01)
                with lock:
                    inside[0] -= 1
        except ResourceExhausted:
            refused.append(1)

    threads = [threading.Thread(target=call) for _ in range(40)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(5)
    assert most[0] <= 5 and refused and not quotas._calls


def test_zero_means_no_limit():
    quotas = Quotas(QuotaLimits(running_tasks=0, argument_bytes=0, output_bytes=0),
                    measured_by({"alice": Measured(running_tasks=10**6, output_bytes=1 << 50)}))
    quotas.check_start("alice", 1 << 30)


def test_finished_records_past_the_quota_are_forgotten_oldest_first():
    quotas = Quotas(QuotaLimits(finished_records=1000))
    assert quotas.records_to_forget("alice", 999) == 0
    assert quotas.records_to_forget("alice", 1003) == 3
    assert Quotas(QuotaLimits(finished_records=0)).records_to_forget("alice", 10**6) == 0


def test_usage_lists_every_quota_in_order():
    quotas = Quotas(QuotaLimits(), measured_by({"alice": Measured(
        running_tasks=3, finished_records=7, output_bytes=1234, largest_arguments=99)}))
    with quotas.acquire_call("alice"):
        usage = quotas.usage("alice")
    limits = QuotaLimits()
    assert usage == [
        Usage("running tasks", 3, limits.running_tasks, "--quota-running-tasks"),
        Usage("open streams", 0, limits.open_streams, "--quota-open-streams"),
        Usage("calls in flight", 1, limits.calls_in_flight, "--quota-calls-in-flight"),
        Usage("argument bytes per task", 99, limits.argument_bytes, "--quota-argument-bytes"),
        Usage("finished records kept", 7, limits.finished_records, "--quota-finished-records"),
        Usage("output bytes on disk", 1234, limits.output_bytes, "--quota-output-bytes"),
    ]


@pytest.mark.parametrize("field, value", [("running_tasks", -1), ("open_streams", "2"),
                                          ("output_bytes", True)])
def test_bad_quota_values_name_the_option(field, value):
    with pytest.raises(InvalidArgument, match=f"--quota-{field.replace('_', '-')} must be 0"):
        QuotaLimits(**{field: value})
