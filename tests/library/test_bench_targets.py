"""The benchmark report's verdicts (bench/targets.py): ratios, met and not
met, and a row for every target even when its section did not run.

Pure functions on a results dict: nothing is measured here.
"""

import math
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")
sys.path.insert(0, BENCH_DIR)
targets = pytest.importorskip("targets")

MiB = 1024 * 1024


def stats(p50, p99=None):
    return {"n": 100, "p50": p50, "p99": p99 if p99 is not None else p50 * 2, "max": p50 * 3}


def results():
    return {
        "history": {"samples": 300, "rows": [
            {"count": 0, "rss_mib": 64.0},
            {"count": 100, "rss_mib": 64.5, "status_us": 400.0, "own_page_us": 500.0, "all_page_us": 800.0},
            {"count": 1_000_000, "rss_mib": 66.0, "rss_after_calls_mib": 70.0, "status_us": 500.0,
             "own_page_us": 900.0, "all_page_us": 2000.0}]},
        "start": {"sandboxed": stats(0.0026), "unconfined": stats(0.0014), "ceiling_unary": stats(0.0006),
                  "gate_spawn_wait": stats(0.0014), "floor": 0.0020},
        "peer": {"api_start": stats(0.0015), "ctl_start": stats(0.066), "taskman_ctl_start": stats(0.070),
                 "cli_floor": stats(0.050)},
        "status": {"taskman": stats(0.00066), "ceiling": stats(0.00060)},
        "sustained": {"taskman": {"clients": 4, "per_second": 610.0, "latency": stats(0.005, 0.021)},
                      "ceiling": {"clients": 4, "per_second": 2400.0, "latency": stats(0.001, 0.004)}},
        "stream": {"bytes": 1024 * MiB, "live": {"rate": 430 * MiB}, "ceiling": {"rate": 460 * MiB}},
        "fanout": {"rows": [{"followers": 1000, "bytes_each": 4 * MiB, "exact": 1000, "rss_peak": 200 * MiB,
                             "aggregate": 470 * MiB}],
                   "ceiling": {"followers": 1000, "exact": 1000, "rss_peak": 190 * MiB}},
        "idle": {"followers": 10_000, "open": 10_000, "rss_before": 80 * MiB, "rss_streams": 900 * MiB,
                 "per_follower": 82 * 1024},
    }


def by_what(rows, start):
    return next(row for row in rows if row.what.startswith(start))


def test_ratio_formatting():
    assert targets.format_ratio(1.234) == "1.23×"
    assert targets.format_ratio(0.9) == "0.90×"
    assert targets.format_ratio(7177.4) == "7177×"
    assert targets.format_ratio(float("nan")) == "n/a"
    assert math.isnan(targets.ratio(1.0, 0))
    assert math.isnan(targets.ratio(None, 2.0))


def test_verdicts():
    assert targets.verdict(True) == "met"
    assert targets.verdict(False) == "**not met**"
    assert targets.verdict(None) == "not measured"
    assert targets.at_most(1.3, 1.3) is True
    assert targets.at_most(1.31, 1.3) is False
    assert targets.at_most(float("nan"), 1.3) is None
    assert targets.at_least(0.9, 0.9) is True
    assert targets.both(True, False) is False
    assert targets.both(True, None) is None


def test_every_target_has_a_row_when_nothing_ran():
    rows = targets.summary({})
    assert sorted({row.target for row in rows}) == ["1", "2", "3", "4", "5", "6", "7"]
    assert all(row.met is None and "not measured" in row.markdown() for row in rows)


def test_rows_from_a_run():
    rows = targets.summary(results())
    assert sorted({row.target for row in rows}) == ["1", "2", "3", "4", "5", "6", "7"]
    history = by_what(rows, "server RSS with 1,000,000")
    assert history.met is True and history.ratio == "+6.0 MiB"  # after the calls, not at start
    assert by_what(rows, "ListTasks, admin's").met is False  # 2.5x its cost with 100 records
    start = by_what(rows, "StartTask p50 (mTLS")
    assert (start.ratio, start.met) == ("1.30×", True)
    assert by_what(rows, "StartTask p50, sandbox mapped off").met is True  # 0.93x supervisord
    assert by_what(rows, "GetTaskStatus p50").met is True  # 1.1x
    assert by_what(rows, "`taskman start` CLI p50").met is False  # 1.06x supervisorctl
    floor = by_what(rows, "`taskman start` CLI p50, beside")
    assert floor.goal == "" and floor.markdown().endswith("|  |")
    assert by_what(rows, "sustained starts").met is True
    assert by_what(rows, "StartTask p99 under").met is False  # 21 ms
    assert by_what(rows, "1,000 followers of one task").met is True  # 1.05x the bare server
    assert by_what(rows, "1,000 followers: aggregate").met is True  # 470 vs 460 MiB/s
    idle = by_what(rows, "10,000 idle followers")
    assert idle.met is True and "82 KiB each" in idle.what and idle.ratio == "n/a"  # no ceiling run
    assert by_what(rows, "1 follower of a live task").met is True  # 430/460 = 0.93x


def test_a_follower_short_of_its_bytes_fails_the_fanout_row_and_quick_runs_say_so():
    run = results()
    run["fanout"]["rows"][0]["exact"] = 999
    run["history"]["rows"][-1]["count"] = 100_000
    run["idle"].update(followers=1000, open=1000)
    rows = targets.summary(run)
    assert by_what(rows, "1,000 followers of one task").met is False
    assert "(quick run: 100,000, not 1,000,000)" in by_what(rows, "server RSS").what
    assert "(quick run: not 10,000)" in by_what(rows, "1,000 idle followers").what


def test_the_live_follower_is_judged_by_its_rounds_not_by_two_medians():
    """Each round's live follow against that round's ceiling: medians taken
    over different rounds (live 300, ceiling 400) would say 0.75x."""
    measured = results()
    measured["stream"].update({
        "live": {"rate": 300 * MiB}, "ceiling": {"rate": 400 * MiB},
        "ratios": [0.95, 0.6, 0.92]})
    row = targets.follower_rows(measured["stream"])[0]
    assert row.ratio == "0.92×"
    assert row.met is True


def test_the_one_follower_section_says_how_the_live_task_was_limited():
    """Section 4 names the writer's CPU quota wherever it shows the task's own
    pace: none since the section's server lifts it, the cgroup's default in
    runs recorded before (--render of an old --json)."""
    report = pytest.importorskip("report")
    row = {"rate": 300 * MiB, "rates": [300 * MiB], "ttfb": 0.002,
           "extra": {"task_seconds": 3.0, "server_cpu": 4.0, "rss_peak": 70 * MiB}}
    stream = {"bytes": 1024 * MiB, "repeats": 1, "ratios": [0.7],
              **{name: row for name in ("pipe", "ceiling", "live", "replay")}}
    old = "\n".join(report._stream({"stream": stream}))
    assert "under its cgroup's CPU quota" in old and "--cpu-quota-us" not in old
    new = "\n".join(report._stream({"stream": dict(stream, task_cpu_quota_us=0)}))
    assert "`--cpu-quota-us 0`" in new and "no CPU quota" in new
    assert "under its cgroup's CPU quota" not in new


def test_the_reload_benchs_pause_counts_from_just_before_the_first_sighup():
    """bench/reload.py: a follower's longest pause counts the gaps that end
    after ``since`` (one under way then counts whole); the bench's own
    start-up before it does not."""
    sys.path.insert(0, os.path.dirname(BENCH_DIR))
    from bench.reload import Follower

    follower = Follower.__new__(Follower)  # no process: only its arrival times
    follower.times = [0.0, 1.2, 1.3, 2.0, 2.4, 3.3]
    assert follower.longest_pause() == pytest.approx(1.2)
    assert follower.longest_pause(since=1.5) == pytest.approx(0.9)  # 2.4 -> 3.3
    assert follower.longest_pause(since=1.9) == pytest.approx(0.9)
    assert follower.longest_pause(since=1.25) == pytest.approx(0.9)  # 1.2 -> 1.3 ends after it
    follower.times = [0.0, 5.0]
    assert follower.longest_pause(since=4.0) == pytest.approx(5.0)  # under way at since: whole


def test_the_sustained_rate_is_shown_beside_the_gates_floor_when_it_ran():
    run = results()
    assert not [row for row in targets.summary(run) if "floor" in row.what and row.target == "5"]
    run["sustained"]["gate_floor"] = {"clients": 4, "per_second": 640.0, "latency": stats(0.006, 0.012)}
    rows = [row for row in targets.summary(run) if row.target == "5"]
    floor = by_what(rows, "the floor itself")
    assert (floor.taskman, floor.that, floor.ratio, floor.met) == ("640/s", "2400/s", "0.27×", None)
    beside = by_what(rows, "sustained starts, beside")
    assert (beside.taskman, beside.that, beside.ratio, beside.goal) == ("610/s", "640/s", "0.95×", "")
    assert by_what(rows, "StartTask p99 under load, beside").ratio == "1.75×"
    # The verdicts stay the target's own: the floor does not excuse a miss.
    assert by_what(rows, "sustained starts, 4").met is True
