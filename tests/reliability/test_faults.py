"""Faults: clients that vanish, readers that stall, a stop under 100 readers,
a full or read-only state directory, a cgroup write the kernel refuses, and
the server killed with SIGKILL and restarted. Real servers, real kernels.
"""

import hashlib
import os
import signal
import subprocess
import time

import gevent
import gevent.pool
import grpc
import pytest
from reliability_support import ReliableServer, wait_ended, wait_for
from server_harness import Cli

from support import fixture, process_running
from taskman.api import task_manager_pb2 as pb

pytestmark = pytest.mark.timeout(240)

# ~6 MB/s: fast enough to matter, slow enough not to fill the disk in a test.


def start(stub, *command):
    return stub.StartTask(pb.StartTaskRequest(command=command[0], args=command[1:]),
                          timeout=30).task_id


def status(stub, task_id):
    return stub.GetTaskStatus(pb.TaskStatusRequest(task_id=task_id), timeout=30)


def open_stream(stub, task_id):
    """A started stream whose first message has arrived (so it is counted)."""
    call = stub.StreamTaskOutput(pb.StreamTaskOutputRequest(task_id=task_id), timeout=120)
    first = next(call)
    return call, first


def stream_refused(stub, task_id):
    call = stub.StreamTaskOutput(pb.StreamTaskOutputRequest(task_id=task_id), timeout=30)
    try:
        next(call)
    except grpc.RpcError as error:
        return error.code()
    finally:
        call.cancel()
    return grpc.StatusCode.OK


def fill_stream_slots(stubs, task_id, count, timeout=30.0):
    """Open ``count`` streams, retrying while slots of cancelled streams are
    still being given back; fail if they never all open."""
    calls = []
    deadline = time.monotonic() + timeout
    while len(calls) < count:
        try:
            calls.append(open_stream(stubs[len(calls) % len(stubs)], task_id)[0])
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert time.monotonic() < deadline, f"only {len(calls)}/{count} stream slots came back"
            time.sleep(0.1)
    return calls


def assert_clean(server, stub):
    """Answers, no zombie, no task group of an ended task (waited for: StopTask
    returns once the stop is signalled, and a group goes just after its end)."""
    assert server.alive()
    wait_for(lambda: server.zombies() == [], 10, "no zombie children")
    wait_for(lambda: all(status(stub, path.rsplit("/", 1)[1]).status == pb.JOB_STATUS_STARTED
                         for path in server.task_groups()), 10,
             "no task group of an ended task")


# -- clients that vanish


def test_clients_disconnecting_mid_stream_give_their_slots_back(start_server):
    limit = 4
    server = start_server("--max-streams", str(limit))
    channel, stub = server.stub()
    task_id = start(stub, fixture("spew.sh"))
    disconnects = 0
    for round_ in range(20):  # cancelled calls and closed channels
        other, other_stub = server.stub()
        call, _ = open_stream(other_stub, task_id)
        next(call)
        if round_ % 2:
            call.cancel()
        else:
            other.close()  # the connection goes away with the stream on it
        disconnects += 1
    for _ in range(5):  # a real client process killed mid-stream: the socket just dies
        follower = Cli(server).follow(task_id, stderr=subprocess.DEVNULL)
        assert follower.stdout.read(65536)
        follower.kill()
        follower.wait(10)
        follower.stdout.close()
        disconnects += 1
    # Every slot comes back: ``limit`` streams open again, one more is refused.
    calls = fill_stream_slots([stub], task_id, limit)
    assert stream_refused(stub, task_id) is grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in calls:
        call.cancel()
    stub.StopTask(pb.StopTaskRequest(task_id=task_id), timeout=30)
    wait_for(lambda: server.log_count(r"method=StreamTaskOutput .*code=CANCELLED") >= disconnects,
             20, "every disconnect logged as CANCELLED")
    assert_clean(server, stub)
    channel.close()


def test_200_streams_cancelled_at_once(start_server):
    streams = 200
    server = start_server("--max-streams", str(streams))
    channel, stub = server.stub()
    task_id = start(stub, "sh", "-c", "echo ready; exec sleep 120")
    wait_for(lambda: os.path.getsize(server.state_dir / "output" / f"{task_id}.log"), 10,
             "first output")
    baseline_fds = server.fd_count()
    channels = [server.stub() for _ in range(4)]
    calls = fill_stream_slots([s for _, s in channels], task_id, streams)
    assert stream_refused(stub, task_id) is grpc.StatusCode.RESOURCE_EXHAUSTED
    for other, _ in channels:  # all 200 cancelled at once
        other.close()
    del calls
    # The count returns to 0: all 200 slots can be taken again, no more.
    channels = [server.stub() for _ in range(4)]
    calls = fill_stream_slots([s for _, s in channels], task_id, streams)
    assert stream_refused(stub, task_id) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status(stub, task_id).status == pb.JOB_STATUS_STARTED  # control calls answer
    # Stopping the task ends all 200 normally.
    stub.StopTask(pb.StopTaskRequest(task_id=task_id), timeout=30)

    def drain(call):
        return b"".join(response.output for response in call)

    outputs = list(gevent.pool.Pool(streams).imap_unordered(drain, calls))
    assert outputs == [b""] * streams  # each had read "ready\n" already
    for other, _ in channels:
        other.close()
    wait_for(lambda: server.log_count(r"method=StreamTaskOutput .*code=CANCELLED") >= streams,
             30, "200 cancellations logged")
    assert server.log_count(r"method=StreamTaskOutput .*code=OK") >= streams
    wait_for(lambda: server.fd_count() <= baseline_fds, 30,
             f"descriptors back to {baseline_fds} (now {server.fd_count()})")
    assert_clean(server, stub)
    channel.close()


def test_a_stalled_reader_does_not_grow_server_memory(start_server):
    server = start_server()
    channel, stub = server.stub()
    task_id = start(stub, "sh", "-c", "while :; do head -c 1048576 /dev/zero; sleep 0.05; done")
    log_file = server.state_dir / "output" / f"{task_id}.log"
    call, _ = open_stream(stub, task_id)  # then never read again
    time.sleep(1)
    rss, sizes = [], []
    for _ in range(16):
        rss.append(server.rss_kib())
        sizes.append(os.path.getsize(log_file))
        time.sleep(0.5)
    written = sizes[-1] - sizes[0]
    growth = max(rss) - rss[0]
    print(f"\nstalled reader: task wrote {written / 1e6:.0f} MB in 8 s; server RSS "
          f"{rss[0] / 1024:.1f} -> max {max(rss) / 1024:.1f} MiB")
    assert written > 50e6, "the writer was throttled by the stalled reader"
    assert growth < 16 * 1024, f"server RSS grew {growth} KiB while a reader stalled"
    call.cancel()
    stub.StopTask(pb.StopTaskRequest(task_id=task_id), timeout=30)
    channel.close()


def test_stop_cuts_endless_output_followed_by_100_readers(start_server):
    readers = 100
    server = start_server()
    channels = [server.stub() for _ in range(4)]
    stub = channels[0][1]
    task_id = start(stub, "sh", "-c", 'i=0; while :; do i=$((i+1)); echo "line $i"; done')

    def follow(index):
        call = channels[index % 4][1].StreamTaskOutput(
            pb.StreamTaskOutputRequest(task_id=task_id), timeout=120)
        digest, size = hashlib.sha256(), 0
        for response in call:
            digest.update(response.output)
            size += len(response.output)
        return size, digest.hexdigest()

    with gevent.Timeout(120):
        followers = [gevent.spawn(follow, index) for index in range(readers)]
        time.sleep(2)
        stub.StopTask(pb.StopTaskRequest(task_id=task_id), timeout=30)
        gevent.joinall(followers, raise_error=True)
    results = {follower.value for follower in followers}
    data = (server.state_dir / "output" / f"{task_id}.log").read_bytes()
    assert results == {(len(data), hashlib.sha256(data).hexdigest())}, results
    lines = data.decode().splitlines()
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)] or \
        lines[:-1] == [f"line {n}" for n in range(1, len(lines))]  # cut mid-line at most
    final = status(stub, task_id)
    assert (final.status, final.termination_signal, final.termination_source) == \
        (pb.JOB_STATUS_SIGNALED, "SIGTERM", "user")
    print(f"\n100 readers: each got {len(data)} bytes, identical to the file")
    for channel, _ in channels:
        channel.close()


# -- the state directory


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs with 12 inodes; unmounted after the test's servers stop."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=12,mode=0700",
                             "tmpfs", str(mount)], capture_output=True, timeout=30)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], timeout=30)


def test_state_dir_disk_full(start_server, small_tmpfs, tmp_path):
    server = start_server(state_dir=small_tmpfs)
    channel, stub = server.stub()
    big = start(stub, "sh", "-c", "head -c 4194304 /dev/zero; echo done >&2")
    final = wait_ended(stub, big)
    # The task's outcome is right although most of its output found no room.
    assert (final.status, final.exit_code) == (pb.JOB_STATUS_EXITED_OK, 0)
    kept = b"".join(r.output for r in stub.StreamTaskOutput(
        pb.StreamTaskOutputRequest(task_id=big), timeout=60))
    assert 0 < len(kept) < 4194304 and set(kept) == {0}
    # Then the file system runs out of inodes: StartTask says so, precisely.
    started, refusal = [big], None
    for _ in range(12):
        try:
            started.append(start(stub, "echo", "hi"))
        except grpc.RpcError as error:
            refusal = error
            break
    assert refusal is not None, "the 12-inode file system never filled up"
    assert refusal.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.details() == "no space left for task output on the server"
    for task_id in started:
        assert wait_ended(stub, task_id).status == pb.JOB_STATUS_EXITED_OK
    assert sorted(server.output_files()) == sorted(started)  # nothing half-made
    assert server.task_groups() == []
    print(f"\ndisk full: kept {len(kept)} of 4194304 bytes; {len(started)} tasks, then "
          f"RESOURCE_EXHAUSTED; task store errors logged: {server.log().count('task store:')}")
    channel.close()


def test_output_dir_read_only(start_server):
    server = start_server()
    channel, stub = server.stub()
    running = start(stub, "sh", "-c", "echo one; sleep 2; echo two")
    output = str(server.state_dir / "output")
    subprocess.run(["mount", "--bind", output, output], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", output], check=True, timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            start(stub, "true")
        assert refused.value.code() is grpc.StatusCode.INTERNAL
        assert refused.value.details() == \
            "cannot create the task's output file: Read-only file system"
        assert len(server.task_groups()) == len(server.root_dirs())  # only `running`'s
    finally:
        subprocess.run(["umount", output], check=True, timeout=30)
    final = wait_ended(stub, running)
    assert (final.status, final.exit_code) == (pb.JOB_STATUS_EXITED_OK, 0)
    assert b"".join(r.output for r in stub.StreamTaskOutput(
        pb.StreamTaskOutputRequest(task_id=running), timeout=30)) == b"one\ntwo\n"
    assert server.output_files() == [running]
    assert server.task_groups() == []
    start(stub, "true")  # writable again: starts work again
    channel.close()


def test_unusable_state_dir_refuses_to_start_in_one_sentence(tmp_path):
    server = ReliableServer(tmp_path / "server", state_dir=tmp_path / "a-file" / "state")
    (tmp_path / "a-file").write_text("not a directory")
    process = subprocess.run(server.command, capture_output=True, timeout=60, env=server.env)
    assert process.returncode == 1
    assert process.stderr.decode().startswith("taskman-server: cannot set up tasks: Not a directory")
    assert "Traceback" not in process.stderr.decode()


# -- cgroups


def test_a_cgroup_write_the_kernel_refuses_fails_the_start_cleanly(start_server):
    # pids.max above PID_MAX_LIMIT (4194304): the kernel answers EINVAL when
    # the fifth of the task's six groups (pids) is configured.
    server = start_server("--pids-max", "5000000")
    channel, stub = server.stub()
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            start(stub, "true")
        assert refused.value.code() is grpc.StatusCode.INTERNAL
        assert refused.value.details().startswith("server cgroup error:")
        assert "pids.max" in refused.value.details()
        assert "Invalid argument" in refused.value.details()
    assert server.task_groups() == []
    assert server.output_files() == []
    assert server.children() == []
    channel.close()


# -- the server killed


def test_server_killed_then_restarted_cleans_up_and_reports_source_server(start_server, tmp_path):
    first = start_server()
    channel, stub = first.stub()
    lone = start(stub, "sh", "-c", "echo before; exec sleep 300")
    tree = start(stub, "sh", "-c", "sleep 300 & sleep 300 & echo kids; wait")
    done = start(stub, "echo", "finished")
    assert wait_ended(stub, done).status == pb.JOB_STATUS_EXITED_OK
    for task_id, text in ((lone, b"before\n"), (tree, b"kids\n")):
        wait_for(lambda t=task_id, x=text: (first.state_dir / "output" / f"{t}.log")
                 .read_bytes() == x, 10, "output")
    pids = set()
    for group in first.task_groups():
        if group.startswith("/sys/fs/cgroup/unified/") or group.startswith("/sys/fs/cgroup/pids/"):
            with open(os.path.join(group, "cgroup.procs")) as procs:
                pids.update(int(line) for line in procs)
    assert len(pids) == 4  # sleep; sh + two sleeps
    channel.close()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    assert all(process_running(pid) for pid in pids)  # orphaned, still running

    second = start_server(state_dir=first.state_dir, cgroup_root=first.cgroup_root)
    channel, stub = second.stub()
    wait_for(lambda: not any(process_running(pid) for pid in pids), 10, "the earlier life's processes killed")
    assert second.task_groups() == []
    for task_id in (lone, tree):
        final = status(stub, task_id)
        assert final.termination_source == "server"
        assert final.status in (pb.JOB_STATUS_SIGNALED, pb.JOB_STATUS_UNKNOWN)
        assert final.HasField("end_time")
    assert (status(stub, lone).status, status(stub, lone).termination_signal) == \
        (pb.JOB_STATUS_SIGNALED, "SIGKILL")  # its main process was found and killed
    assert (status(stub, done).status, status(stub, done).termination_source) == \
        (pb.JOB_STATUS_EXITED_OK, "")
    for task_id, text in ((lone, b"before\n"), (tree, b"kids\n"), (done, b"finished\n")):
        assert b"".join(r.output for r in stub.StreamTaskOutput(
            pb.StreamTaskOutputRequest(task_id=task_id), timeout=30)) == text  # nothing lost
    assert "was running when the server stopped" in second.log()
    fresh = start(stub, "true")
    assert wait_ended(stub, fresh).status == pb.JOB_STATUS_EXITED_OK
    assert second.task_groups() == []
    channel.close()
