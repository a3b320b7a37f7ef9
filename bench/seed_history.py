"""Seed a state directory's task store with N finished records, directly.

    python bench/seed_history.py STATE_DIR N [--users 10 | --owners client001,client002]

For the history benchmark (bench/history.py): a server started on the state
directory then holds N finished tasks, as if it had run them, without
running any. The records are written by the ``TaskStore`` of whichever
taskman is first on ``sys.path`` (its schema and indexes), then filled with
one ``executemany`` in one transaction. No output files are made: a
finished task whose log is missing reads as empty output.

Each user's records alternate among the finished states; start times are
1 ms apart, ending an hour before now, so nothing is past the default
retention age (the benchmark also turns retention off).
"""

import argparse
import json
import os
import sqlite3
import sys
import time
import uuid

COLUMNS = ("id", "owner", "command", "args", "pid", "status", "exit_code", "signal",
           "source", "start_time", "end_time", "output_size", "output_dropped", "output_note")
FINISHED = ((3, 0, ""), (4, 1, ""), (2, 137, "SIGKILL"))  # EXITED_OK, EXITED_ERROR, SIGNALED


def seed(state_dir: str, count: int, users: int = 10, owners: str = "") -> float:
    """Write ``count`` finished records into ``state_dir``'s store; return the
    seconds it took. Owned in turn by ``users`` users user000... or by the
    comma-separated ``owners``."""
    from taskman.store import TaskStore  # the schema of the taskman under test

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "tasks.db")
    TaskStore(path).close()
    began = time.perf_counter()
    first = time.time() - 3600 - count * 0.001
    args = json.dumps(["-c", "echo seeded"])
    names = owners.split(",") if owners else [f"user{number:03d}" for number in range(users)]

    def rows():
        for number in range(count):
            status, code, signal = FINISHED[number % len(FINISHED)]
            start = first + number * 0.001
            yield (str(uuid.UUID(int=number + 1, version=4)), names[number % len(names)], "sh",
                   args, 1000 + number % 30000, status, code, signal, "", start, start + 0.0005,
                   0, 0, "")

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN")
        db.executemany(f"INSERT INTO tasks ({', '.join(COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(COLUMNS))})", rows())
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.perf_counter() - began


def task_id(number: int) -> str:
    """The id of the ``number``th seeded record (0 is the oldest)."""
    return str(uuid.UUID(int=number + 1, version=4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state_dir")
    parser.add_argument("count", type=int)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--owners", default="", help="comma-separated owners (default: --users of them)")
    options = parser.parse_args()
    seconds = seed(options.state_dir, options.count, options.users, options.owners)
    print(f"seeded {options.count} records in {seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
