"""History costs disk, not memory (#20): a manager's RSS and the cost of
GetTaskStatus and ListTasks with N finished records kept, N=100 against
N=1,000,000, before and after the change, in one run.

For each taskman tree (this one, and with ``--before COMMIT`` that commit,
exported with ``git archive`` to a scratch directory) and each N: a fresh
state directory is seeded with N finished records (bench/seed_history.py:
one executemany in one transaction), then a child process of that tree
builds a TaskManager on it (the ``none`` driver, retention off, as
taskman-server's library core) and reports its start time, its RSS, and
the p50 of ``status`` of old tasks and of listing pages of equal size at
every N (so the rows compare the same work):

- status: a random seeded task, as its owner;
- own page: a user's newest 10 (the ``limit`` is page+1, as the servicer asks);
- all page: an admin's newest 50; all after: the 50 after a random task;
- filtered: an admin's newest 20 EXITED_ERROR.

    flock /tmp/taskman-heavy.lock /work/venv/bin/python bench/history.py --before dddb394

``--counts 100,100000`` for a quick run. RSS of an empty manager (N=0) is the
baseline the target compares with. ``--server`` measures a real taskman-server
instead (retention and the finished-records quota off, the ``none`` driver;
records owned by client001 and client002; the calls over mTLS from this
process): its RSS once it answers, and the p50 of GetTaskStatus and ListTasks
(client001's newest 10, admin's newest 50).
"""

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seed_history import task_id  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
USERS = 10
SAMPLES = 300
MiB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a commit to compare with (exported with git archive)")
    parser.add_argument("--counts", default="0,100,1000000")
    parser.add_argument("--server", action="store_true", help="a real taskman-server")
    parser.add_argument("--child", nargs=2, metavar=("STATE_DIR", "COUNT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options.child[0], int(options.child[1]))
    counts = [int(count) for count in options.counts.split(",")]
    scratch = tempfile.mkdtemp(prefix="taskman-history-")
    try:
        trees = [("after", REPO_DIR)]
        if options.before:
            trees.insert(0, (f"before ({options.before})", export(options.before, scratch)))
        rows = []
        for name, tree in trees:
            for count in counts:
                rows.append((measure_server if options.server else measure)(name, tree, count, scratch))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print_table(rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def section_history(bench) -> None:
    """For bench/run.py: the installed taskman-server on 0, 100 and
    ``--history-records`` seeded records, each on a fresh state directory."""
    scratch = tempfile.mkdtemp(prefix="history-", dir=bench.workdir)
    try:
        rows = []
        for count in (0, 100, bench.args.history_records):
            rows.append(measure_server("installed", None, count, scratch))
            bench.log(f"history {count:,} records: rss {rows[-1]['rss_mib']} MiB, start "
                      f"{rows[-1]['start_s']} s, status p50 {rows[-1].get('status_us', '-')} us")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bench.results["history"] = {"rows": rows, "samples": SAMPLES}


def export(commit: str, scratch: str) -> str:
    tree = os.path.join(scratch, "tree-" + commit)
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", commit, "taskman", "bench"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree


def _environment(tree) -> dict:
    """The environment that runs ``tree``'s taskman; the installed one for None."""
    if tree is None:
        return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return dict(os.environ, PYTHONPATH=tree)


def seed_state(tree, count: int, scratch: str, owners: str = "") -> tuple:
    """A fresh state directory with ``count`` records, in ``tree``'s schema
    (None: the installed taskman's); (path, seconds)."""
    state = os.path.join(scratch, f"state-{len(os.listdir(scratch))}")
    seeded = subprocess.run([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from seed_history import seed; "
        "print(seed(%r, %d, %d, %r))") % (BENCH_DIR, state, count, USERS, owners)],
        env=_environment(tree), check=True, capture_output=True, text=True, cwd=tree or scratch)
    return state, float(seeded.stdout.strip().splitlines()[-1])


def measure_server(name: str, tree, count: int, scratch: str) -> dict:
    """A real taskman-server (``tree``'s, or the installed one for None) on
    ``count`` seeded records: its RSS once it answers, and call latencies."""
    from common import certs_dir, free_port, stop_process
    from common import rss_bytes as process_rss

    from taskman.client import ClientError, TaskmanClient

    certs = certs_dir()
    state, seed_seconds = seed_state(tree, count, scratch, owners="client001,client002")
    address = f"127.0.0.1:{free_port()}"
    environment = dict(_environment(tree), TASKMAN_CERTS_DIR=certs)
    began = time.perf_counter()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "taskman-server"), "--server-address", address,
         "--state-dir", state, "--cgroup-driver", "none", "--retention", "0", "--output-budget", "0",
         "--quota-finished-records", "0"], env=environment, cwd=tree or scratch,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    clients = {user: TaskmanClient(address, user, certs_dir=certs, timeout=600)
               for user in ("client001", "admin")}
    try:
        while True:
            try:
                clients["admin"].list(limit=1)
                break
            except ClientError:
                if server.poll() is not None or time.perf_counter() - began > 900:
                    raise RuntimeError(f"taskman-server on {count} records did not start") from None
                time.sleep(0.2)
        result = {"tree": name, "count": count, "seed_s": round(seed_seconds, 1),
                  "start_s": round(time.perf_counter() - began, 1),
                  "rss_mib": round(process_rss(server.pid) / MiB, 1)}
        if count:
            rng = random.Random(20)
            picks = [rng.randrange(0, count, 2) for _ in range(SAMPLES)]  # client001's: even
            result["status_us"] = p50_us(lambda n: clients["client001"].status(task_id(n)), picks)
            result["own_page_us"] = p50_us(lambda n: clients["client001"].list(limit=10), picks)
            result["all_page_us"] = p50_us(lambda n: clients["admin"].list(limit=50), picks)
            result["rss_after_calls_mib"] = round(process_rss(server.pid) / MiB, 1)
        result["disk_mib"] = round(disk_mib(state), 1)
        return result
    finally:
        for client in clients.values():
            client.close()
        stop_process(server)
        shutil.rmtree(state, ignore_errors=True)


def measure(name: str, tree: str, count: int, scratch: str) -> dict:
    state, seed_seconds = seed_state(tree, count, scratch)
    environment = dict(os.environ, PYTHONPATH=tree)
    child_run = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "history.py"),
                                "--child", state, str(count)],
                               env=environment, check=True, capture_output=True, text=True, cwd=tree)
    result = json.loads(child_run.stdout.strip().splitlines()[-1])
    result.update(tree=name, count=count, seed_s=round(seed_seconds, 1),
                  disk_mib=round(disk_mib(state), 1))
    shutil.rmtree(state, ignore_errors=True)
    return result


def disk_mib(state: str) -> float:
    total = 0
    for directory, _, files in os.walk(state):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total / MiB


def child(state: str, count: int) -> int:
    """In the tree under test (PYTHONPATH): build a manager on ``state``, measure, print JSON."""
    from taskman import cgroups
    from taskman.manager import TaskManager
    from taskman.task import JobStatus

    began = time.perf_counter()
    manager = TaskManager(state, driver=cgroups.select_driver("none"), retention_age=0,
                          retention_bytes=0)
    started = time.perf_counter() - began
    gc.collect()
    rss = rss_bytes()
    result = {"start_s": round(started, 2), "rss_mib": round(rss / MiB, 1),
              "taskman": os.path.dirname(sys.modules["taskman"].__file__)}
    if count:
        rng = random.Random(20)
        picks = [rng.randrange(count) for _ in range(SAMPLES)]

        def status(number):
            manager.status(f"user{number % USERS:03d}", task_id(number))

        def middle_id(number):
            return task_id(min(max(number, 60), count - 1))

        result["status_us"] = p50_us(status, picks)
        result["own_page_us"] = p50_us(lambda n: manager.tasks(f"user{n % USERS:03d}", limit=11), picks)
        result["all_page_us"] = p50_us(lambda n: manager.tasks("admin", limit=51), picks)
        result["all_after_us"] = p50_us(lambda n: manager.tasks("admin", limit=51, after=middle_id(n)),
                                        picks)
        result["filtered_us"] = p50_us(lambda n: manager.tasks("admin", statuses=[JobStatus.EXITED_ERROR],
                                                               limit=21), picks)
        gc.collect()
        result["rss_after_calls_mib"] = round(rss_bytes() / MiB, 1)
    manager.shutdown(timeout=5)
    print(json.dumps(result))
    return 0


def p50_us(call, picks) -> float:
    times = []
    for number in picks:
        began = time.perf_counter()
        call(number)
        times.append(time.perf_counter() - began)
    times.sort()
    return round(times[len(times) // 2] * 1e6, 1)


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


COLUMNS = ("tree", "count", "seed_s", "disk_mib", "start_s", "rss_mib", "rss_after_calls_mib",
           "status_us", "own_page_us", "all_page_us", "all_after_us", "filtered_us")


def print_table(rows) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row.get(column, "-")) for column in COLUMNS) + " |")


if __name__ == "__main__":
    sys.exit(main())
