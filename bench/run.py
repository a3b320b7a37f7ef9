#!/usr/bin/env python3
"""taskman benchmarks, side by side with their floors and with supervisord.

    python bench/run.py [--quick] [--only SECTIONS] [--output docs/benchmarks.md] [options]

Starts a real taskman-server (default cgroup driver and limits, temp
--state-dir, a free loopback port, output cap, disk budget and per-user
quotas off, client002 mapped to root), a bare gRPC server with the same
certificates and gevent set-up (the transport ceiling, bench/ceiling.py)
and a private supervisord (the one-follower section starts a second
taskman-server of its own with the task CPU quota off, so that its live
writer is not held to 20% of a CPU), measures everything in one run on this machine
and writes the report: every target's rows with their baselines from the
same run, met or not met (bench/targets.py). Everything it starts is stopped
on exit and its temp directory (task output included) removed. Needs root
(cgroups, the sandbox), and `pip install . -r bench/requirements.txt` into
the interpreter that runs it.

The sections, in the order they run (``--only`` takes a comma-separated
subset): history, start, status, sustained, stream, fanout, idle, memory,
peer, profile.
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import history  # noqa: E402
import idle  # noqa: E402
import latency  # noqa: E402
import machine  # noqa: E402
import profiling  # noqa: E402
import recorded  # noqa: E402
import report  # noqa: E402
import side_by_side  # noqa: E402
import streams  # noqa: E402
from common import GiB, MiB  # noqa: E402
from harness import USER, Bench  # noqa: E402
from servers import UNCONFINED_USER, CeilingServer, TaskmanServer, find_script  # noqa: E402

DEFAULT_OUTPUT = os.path.join(common.REPO_DIR, "docs", "benchmarks.md")

SECTIONS = {
    "history": history.section_history,
    "start": latency.section_start,
    "status": latency.section_status,
    "sustained": latency.section_sustained,
    "stream": streams.section_stream,
    "fanout": streams.section_fanout,
    "idle": idle.section_idle,
    "memory": streams.section_memory,
    "peer": side_by_side.section_peer,
    "profile": profiling.section_profile,
}

FULL = dict(start_samples=1000, status_samples=2000, sustain_seconds=10.0,
            stream_bytes=GiB, repeats=5, fanout=[1, 10, 100, 1000],
            fanout_budget=4 * GiB, fanout_max=256 * MiB, memory_bytes=10 * GiB,
            tail_window=20.0, profile_seconds=8.0, idle_followers=10_000,
            history_records=1_000_000, cli_samples=20)
QUICK = dict(start_samples=200, status_samples=300, sustain_seconds=3.0,
             stream_bytes=128 * MiB, repeats=1, fanout=[1, 10, 100, 1000],
             fanout_budget=256 * MiB, fanout_max=32 * MiB, memory_bytes=512 * MiB,
             tail_window=5.0, profile_seconds=3.0, idle_followers=1000,
             history_records=100_000, cli_samples=5)
COUNTS = ("idle_followers", "history_records", "cli_samples", "start_samples", "status_samples",
          "repeats")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and counts: a smoke run of a minute or two")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report path (markdown)")
    parser.add_argument("--json", default=None,
                        help="also write the raw results here (for before/after comparisons)")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="measure nothing: rewrite the report from a --json file")
    parser.add_argument("--tmpdir", default=None,
                        help="where the temp state dir goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--server", default=None, help="taskman-server script to run")
    parser.add_argument("--only", default="",
                        help="comma-separated sections: " + ",".join(SECTIONS) + " (default: all)")
    for name, value in FULL.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, type=lambda text: [int(x) for x in text.split(",")])
        elif isinstance(value, float):
            parser.add_argument(flag, type=float)
        elif name in COUNTS:
            parser.add_argument(flag, type=int)
        else:
            parser.add_argument(flag, type=size)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def size(text: str) -> int:
    """'1G', '512M', '64K' or a plain number of bytes."""
    units = {"K": 1024, "M": MiB, "G": GiB}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def measuring_args(argv: List[str]) -> List[str]:
    """The command line without the options that only say where results go."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--output", "--json"):
            skip = True
            continue
        if word.startswith(("--output=", "--json=")):
            continue
        kept.append(shlex.quote(word))
    return kept


def rerender(args: argparse.Namespace) -> int:
    """Write the report again from a --json file (after editing bench/findings.md)."""
    with open(args.render) as handle:
        saved = json.load(handle)
    args.profile_seconds = saved.get("profile_seconds", args.profile_seconds)
    text = report.render(saved["results"], saved["machine"], saved.get("command", "python bench/run.py"),
                         saved.get("failures", {}), saved.get("notes", []), args)
    write_report(args.output, text)
    return 0


def write_report(path: str, text: str) -> None:
    """Write the report, with the blocks that benches of their own recorded
    in the one it replaces (bench/recorded.py) carried over unchanged."""
    kept = recorded.carried(path)
    if kept:
        text = text.rstrip("\n") + "\n\n" + kept.rstrip("\n") + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return rerender(args)
    only = [name for name in args.only.split(",") if name] or list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("warning: not root: the default cgroup driver will refuse to start",
              file=sys.stderr)
    # Thousands of followers: a socket each in the server (which inherits
    # this limit), and each stream's own descriptors (its output file...).
    streams_wanted = max(args.idle_followers if "idle" in only else 0, max(args.fanout, default=1))
    common.raise_nofile(streams_wanted * 8 + 4096)
    command = "python bench/run.py" + "".join(" " + word for word in measuring_args(
        sys.argv[1:] if argv is None else argv))
    from taskman.client import TaskmanClient

    common.certs_dir()  # one PKI for the servers and the clients, made before any starts
    workdir = tempfile.mkdtemp(prefix="taskman-bench-", dir=args.tmpdir)
    bench = Bench(args, workdir)
    failures: Dict[str, str] = {}
    info: Dict[str, str] = {}
    began = time.monotonic()
    try:
        bench.server = TaskmanServer(workdir, find_script("taskman-server", args.server), streams_wanted + 100)
        bench.ceiling = CeilingServer(workdir)
        with bench.server, bench.ceiling, TaskmanClient(bench.server.address, USER) as client, \
                TaskmanClient(bench.server.address, UNCONFINED_USER) as unconfined, \
                TaskmanClient(bench.ceiling.address, USER) as ceiling_client:
            bench.log(f"taskman-server pid {bench.server.pid} on {bench.server.address}; "
                      f"ceiling on {bench.ceiling.address}; temp dir {workdir}")
            info = machine.machine(workdir, bench.server)
            bench.client, bench.unconfined_client, bench.ceiling_client = client, unconfined, ceiling_client
            for name, section in SECTIONS.items():
                if name not in only:
                    continue
                try:
                    section(bench)
                except Exception as error:  # the report says what failed; go on
                    traceback.print_exc()
                    failures[name] = f"{type(error).__name__}: {error}"
                finally:
                    bench.close_workers()
    finally:
        bench.close_workers()
        shutil.rmtree(workdir, ignore_errors=True)
    bench.notes.append(f"Whole run: {(time.monotonic() - began) / 60:.1f} minutes.")
    text = report.render(bench.results, info, command, failures, bench.notes, args)
    write_report(args.output, text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "results": bench.results, "failures": failures,
                       "notes": bench.notes, "command": command,
                       "profile_seconds": args.profile_seconds},
                      handle, indent=1, default=str)
    bench.log(f"wrote {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
