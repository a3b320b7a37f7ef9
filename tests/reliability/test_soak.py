"""Load and soak (``tox -e soak``; deselected by default): many tasks in a
row, many at once, and afterwards nothing leaked -- checked, not assumed.

Leaks are measured from outside the server: descriptors (/proc/<pid>/fd),
threads, RSS, zombie children, task cgroups, output files. Greenlets cannot
be seen from outside, so ``test_library_soak_leaks_no_greenlets`` runs the
same kind of load through the library in this process and counts greenlet
objects with gc.

Each baseline is taken after a warm-up (``WARM_UP`` tasks run the way the
measured load runs them), because a server makes some things once, on first
need, and keeps them: the task store's checkpoint connection (the database
and its WAL: 2 descriptors) and thread, opened at its CHECKPOINT_COMMITS-th
commit; the thread pools' threads, started as work overlaps. Measured before
them, every run failed ("descriptors back to 21 (now 23)": those two files);
measured after, anything made per task still shows thousands of times over.
"""

import gc
import os
import random
import time

import gevent
import gevent.pool
import greenlet
import pytest
from reliability_support import wait_for

from taskman import cgroups
from taskman.api import task_manager_pb2 as pb
from taskman.manager import TaskManager
from taskman.store import CHECKPOINT_COMMITS

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]

SHORT_TASKS = int(os.environ.get("TASKMAN_SOAK_TASKS", "10000"))
CONCURRENT = int(os.environ.get("TASKMAN_SOAK_CONCURRENT", "1000"))
LIBRARY_TASKS = int(os.environ.get("TASKMAN_SOAK_LIBRARY_TASKS", "2000"))
# Tasks before the baseline: each commits its record twice (started, ended),
# so the store's checkpointer has run (twice) before anything is measured.
WARM_UP = CHECKPOINT_COMMITS


def start(stub, *command):
    return stub.StartTask(pb.StartTaskRequest(command=command[0], args=command[1:]),
                          timeout=60).task_id


def status(stub, task_id):
    return stub.GetTaskStatus(pb.TaskStatusRequest(task_id=task_id), timeout=60)


def run_to_end(stub, *command):
    task_id = start(stub, *command)
    while True:
        final = status(stub, task_id)
        if final.status != pb.JOB_STATUS_STARTED:
            return task_id, final
        time.sleep(0.002)


def warm_up(stub, in_flight):
    list(gevent.pool.Pool(in_flight).imap_unordered(lambda _: run_to_end(stub, "true"),
                                                    range(WARM_UP)))


def footprint(server):
    return {"fds": server.fd_count(), "threads": server.threads(),
            "rss_mib": round(server.rss_kib() / 1024, 1)}


def assert_nothing_leaked(server, baseline, descriptors, label):
    """``descriptors``: the server's fd_targets() at the baseline, to name
    what was opened since if the count does not come back."""
    try:
        wait_for(lambda: server.fd_count() <= baseline["fds"], 30, "descriptors")
    except AssertionError:
        now = server.fd_targets()
        opened = {fd: what for fd, what in sorted(now.items()) if descriptors.get(fd) != what}
        raise AssertionError(f"{label}: descriptors not back to {baseline['fds']} within 30 s "
                             f"(now {len(now)}); not open at the baseline: {opened}") from None
    wait_for(lambda: server.zombies() == [], 30, f"{label}: no zombie children")
    assert server.children() == [], f"{label}: children left: {server.children()}"
    assert server.task_groups() == [], f"{label}: task cgroups left"
    assert server.threads() <= baseline["threads"], f"{label}: threads grew"
    after = footprint(server)
    print(f"\n{label}: before {baseline}, after {after}")
    return after


def test_10000_short_tasks_in_a_row(start_server):
    server = start_server()
    channel, stub = server.stub()
    warm_up(stub, 4)
    baseline, descriptors = footprint(server), server.fd_targets()
    began = time.monotonic()
    results = list(gevent.pool.Pool(4).imap_unordered(lambda _: run_to_end(stub, "true"),
                                                      range(SHORT_TASKS)))
    elapsed = time.monotonic() - began
    assert {final.status for _, final in results} == {pb.JOB_STATUS_EXITED_OK}
    assert len({task_id for task_id, _ in results}) == SHORT_TASKS
    after = assert_nothing_leaked(server, baseline, descriptors, f"{SHORT_TASKS} short tasks")
    # Ended tasks are kept (retention: 7 days), each with its (empty) output file.
    assert len(server.output_files()) == SHORT_TASKS + WARM_UP
    print(f"{SHORT_TASKS} tasks in {elapsed:.1f}s ({SHORT_TASKS / elapsed:.0f}/s, 4 in flight); "
          f"RSS +{after['rss_mib'] - baseline['rss_mib']:.1f} MiB for {SHORT_TASKS} kept records")
    channel.close()


def test_1000_concurrent_sleeping_tasks_with_1000_status_calls(start_server):
    server = start_server("--max-streams", "16")
    channel, stub = server.stub()
    warm_up(stub, 8)
    baseline, descriptors = footprint(server), server.fd_targets()
    began = time.monotonic()
    task_ids = list(gevent.pool.Pool(8).imap_unordered(lambda _: start(stub, "sleep", "300"),
                                                       range(CONCURRENT)))
    started = time.monotonic() - began
    assert len([pid for pid, state in server.children() if state != "Z"]) == CONCURRENT
    assert len(server.task_groups()) == len(server.root_dirs()) * CONCURRENT
    loaded = footprint(server)
    rng = random.Random(1000)
    began = time.monotonic()
    answers = list(gevent.pool.Pool(16).imap_unordered(
        lambda task_id: status(stub, task_id), [rng.choice(task_ids) for _ in range(1000)]))
    status_time = time.monotonic() - began
    assert {answer.status for answer in answers} == {pb.JOB_STATUS_STARTED}
    began = time.monotonic()
    list(gevent.pool.Pool(50).imap_unordered(
        lambda task_id: stub.StopTask(pb.StopTaskRequest(task_id=task_id), timeout=120), task_ids))
    stop_time = time.monotonic() - began
    finals = [status(stub, task_id) for task_id in task_ids]
    assert {(f.status, f.termination_signal, f.termination_source) for f in finals} == \
        {(pb.JOB_STATUS_SIGNALED, "SIGTERM", "user")}
    assert_nothing_leaked(server, baseline, descriptors, f"{CONCURRENT} concurrent tasks")
    print(f"started {CONCURRENT} in {started:.1f}s; while running: {loaded}; 1000 status calls "
          f"in {status_time:.2f}s; stopped all in {stop_time:.1f}s")
    channel.close()


def _greenlets():
    """Live greenlets of this thread, the hub's, where every task's greenlets
    run. Not those of the thread pools' workers (a thread's main greenlet and
    its worker, two per thread): a pool starts its threads as work overlaps,
    up to its fixed size, and keeps them (gevent's idle timeout is off), so
    how many the warm-up started varies; they are threads, not tasks'."""
    gc.collect()
    hubs_thread = _root(greenlet.getcurrent())
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet)
               and not obj.dead and _root(obj) is hubs_thread)


def _root(glet):
    while glet.parent is not None:
        glet = glet.parent
    return glet


def test_library_soak_leaks_no_greenlets(tmp_path):
    """The library under load in this process: live greenlets, descriptors
    and output files of forgotten tasks return to where they were."""
    try:
        driver = cgroups.select_driver("auto", cgroups.Limits(),
                                       root=f"taskman-soak-{os.getpid()}")
    except Exception as error:  # noqa: BLE001 - the reason is shown
        pytest.skip(f"no cgroup driver here: {error}")
    manager = TaskManager(str(tmp_path / "state"), driver=driver, stop_grace=1.0)
    try:
        output_dir = tmp_path / "state" / "output"

        def one(index):
            task = manager.start("alice", "sh", ["-c", f"echo {index}"])
            with gevent.Timeout(30):
                assert b"".join(manager.stream("alice", task.id)) == b"%d\n" % index
            return task.id

        with gevent.Timeout(600):
            ids = list(gevent.pool.Pool(8).imap_unordered(one, range(WARM_UP)))
            baseline_greenlets, baseline_fds = _greenlets(), len(os.listdir("/proc/self/fd"))
            ids += gevent.pool.Pool(8).imap_unordered(one, range(WARM_UP, WARM_UP + LIBRARY_TASKS))
            # and some stopped mid-run, with a follower each
            sleepers = [manager.start("alice", "sleep", ["300"]) for _ in range(50)]
            followers = [gevent.spawn(lambda t=t: list(manager.stream("alice", t.id)))
                         for t in sleepers]
            gevent.sleep(0.1)
            for task in sleepers:
                manager.stop("alice", task.id)
            gevent.joinall(followers, raise_error=True)
        wait_for(lambda: all(not manager.status("alice", i).running for i in ids), 30, "all ended")
        assert len(os.listdir(output_dir)) == WARM_UP + LIBRARY_TASKS + 50
        # Forget them all (retention): their records and output files go.
        manager.retention_age = 1e-9
        time.sleep(0.01)
        assert manager.prune() == WARM_UP + LIBRARY_TASKS + 50
        assert os.listdir(output_dir) == []
        greenlets, fds = _greenlets(), len(os.listdir("/proc/self/fd"))
        print(f"\nlibrary soak: {LIBRARY_TASKS} tasks + 50 stopped; live greenlets "
              f"{baseline_greenlets} -> {greenlets}; fds {baseline_fds} -> {fds}")
        assert greenlets <= baseline_greenlets
        assert fds <= baseline_fds
    finally:
        manager.shutdown(timeout=15)
    assert not any(os.path.isdir(os.path.join(path, name)) for path in driver_bases(driver)
                   for name in (os.listdir(path) if os.path.isdir(path) else []))


def driver_bases(driver):
    return [hierarchy.base for hierarchy in getattr(driver, "hierarchies", [])]
