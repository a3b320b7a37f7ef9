"""supervisord side by side: its API and CLI against taskman's, in one run.

The taskman rows of the same table come from the other sections (StartTask,
GetTaskStatus); this one adds supervisord's startProcess, getProcessInfo,
``supervisorctl start`` and ``tail -f``, and taskman's own CLI: ``taskman
start`` and ``taskman stream`` as a user types them, with the floor any gRPC
CLI pays interleaved (bench/cli_floor.py: import grpc, one mTLS call).
"""

import os
import subprocess
import sys
import time
from typing import Dict, List

import common
import peer
from common import fmt_ms, fmt_rate, stats
from harness import USER
from latency import TRUE
from servers import find_script


def section_peer(bench) -> None:
    size = bench.args.stream_bytes
    directory = os.path.join(bench.workdir, "supervisord")
    os.makedirs(directory)
    writer = f"head -c {size} /dev/zero"
    result: Dict[str, object] = {"bytes": size, "window": bench.args.tail_window}
    samples = max(50, bench.args.start_samples // 5)
    with peer.Supervisord(directory, writer) as supervisord:
        result["version"] = supervisord.rpc.supervisor.getSupervisorVersion()
        latencies, abnormal = supervisord.api_start_latencies(samples)
        result["api_start"] = stats(latencies)
        result["api_start_abnormal"] = abnormal
        latencies = []
        for _ in range(samples):
            began = time.perf_counter()
            supervisord.rpc.supervisor.getProcessInfo("true")
            latencies.append(time.perf_counter() - began)
        result["api_status"] = stats(latencies)
        taskman_cli = os.path.join(os.path.dirname(find_script("taskman-server", bench.args.server)),
                                   "taskman")
        if os.path.exists(taskman_cli):
            result.update(cli_starts(bench, supervisord, taskman_cli, bench.args.cli_samples))
        else:
            bench.notes.append("taskman CLI not found beside taskman-server: CLI rows skipped.")
            result["ctl_start"] = stats(supervisord.ctl_start_latencies(bench.args.cli_samples))
        result["writer_alone"] = supervisord.writer_alone(size, timeout=120)
        with common.RssSampler(supervisord.pid) as rss:
            result["tail"] = supervisord.tail_follow(size, bench.args.tail_window)
        result["supervisord_rss"] = (rss.first, rss.peak)
    if os.path.exists(taskman_cli):
        result["cli_imports"] = cli_imports(bench, taskman_cli)
        result["taskman_cli_stream"] = cli_stream(bench, taskman_cli, size)
    bench.results["peer"] = result
    bench.log(f"peer: supervisord startProcess p50 {fmt_ms(result['api_start']['p50'])}, "
              f"supervisorctl start p50 {fmt_ms(result['ctl_start']['p50'])}, taskman start p50 "
              f"{fmt_ms(result.get('taskman_ctl_start', {}).get('p50', float('nan')))}, tail -f "
              f"{fmt_rate(result['tail']['bytes'] / result['tail']['seconds'])}")


def cli_starts(bench, supervisord, cli: str, count: int) -> Dict[str, dict]:
    """`taskman start`, `supervisorctl start` and the floor, each as a user
    types it (interpreter start included), interleaved one by one."""
    timed: Dict[str, List[float]] = {"taskman_ctl_start": [], "ctl_start": [], "cli_floor": [],
                                     "python": [], "import_grpc": [], "import_api": []}
    floor_command = [sys.executable, os.path.join(common.BENCH_DIR, "cli_floor.py"),
                     bench.ceiling.address]
    # The floor's parts: the interpreter alone, then with grpc imported; and
    # grpc with taskman's generated modules (protobuf's runtime), which the
    # floor leaves out (it sends raw bytes) and every typed client imports.
    parts = {"python": [sys.executable, "-c", "pass"],
             "import_grpc": [sys.executable, "-c", "import grpc"],
             "import_api": [sys.executable, "-c", "import grpc, taskman.api.task_manager_pb2_grpc"]}
    for _ in range(count):
        began = time.perf_counter()
        subprocess.run([sys.executable, cli, "start", "--user-id", USER, "--server-address",
                        bench.server.address, "--", TRUE],
                       check=True, capture_output=True, timeout=60)
        timed["taskman_ctl_start"].append(time.perf_counter() - began)
        timed["ctl_start"] += supervisord.ctl_start_latencies(1)
        began = time.perf_counter()
        subprocess.run(floor_command, check=True, timeout=60)
        timed["cli_floor"].append(time.perf_counter() - began)
        for name, command in parts.items():
            began = time.perf_counter()
            subprocess.run(command, check=True, timeout=60)
            timed[name].append(time.perf_counter() - began)
    return {name: stats(values) for name, values in timed.items()}


def cli_imports(bench, cli: str, top: int = 8) -> List[list]:
    """`python -X importtime` of one `taskman start`: the top-level imports
    that cost the most, [[module, cumulative seconds]], and the total."""
    proc = subprocess.run([sys.executable, "-X", "importtime", cli, "start", "--user-id", USER,
                           "--server-address", bench.server.address, "--", TRUE],
                          check=True, capture_output=True, text=True, timeout=60)
    costs = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name.startswith("   "):  # top level: one space
            costs.append([name.strip(), int(cumulative) / 1e6])
    costs.sort(key=lambda cost: -cost[1])
    return [["(all top-level imports)", sum(cost for _, cost in costs)]] + costs[:top]


def cli_stream(bench, cli: str, size: int) -> dict:
    """`taskman stream` of a live 'head -c SIZE /dev/zero' task, read from its stdout."""
    task_id = bench.client.start("head", ["-c", str(size), "/dev/zero"])
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, cli, "stream", task_id, "--user-id", USER,
                             "--server-address", bench.server.address],
                            stdout=subprocess.PIPE, start_new_session=True)
    received, first = 0, None
    try:
        while True:
            data = proc.stdout.read1(1 << 20)
            if not data:
                break
            if first is None:
                first = time.perf_counter() - began
            received += len(data)
        proc.wait(60)
    finally:
        common.stop_process(proc, grace=2)
    elapsed = time.perf_counter() - began
    bench.wait_ended(task_id, 60)
    bench.server.discard_output(task_id)
    return {"bytes": received, "seconds": elapsed, "ttfb": first,
            "rate": received / elapsed, "exit": proc.returncode}
