"""A stop's signal reaches the task's main process before the rest of its group.

A shell that sees its child die of SIGTERM before it gets its own exits with
a status (and prints "Terminated") instead of dying of the signal: the task
would read EXITED_ERROR where the stop sent SIGTERM.
"""

import signal
import subprocess

from taskman.cgroups import cgroupfs


def test_the_main_process_is_signalled_first(tmp_path, monkeypatch):
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(4)]
    try:
        main = sleepers[-1].pid  # the highest pid: listed last, and last in a set
        (tmp_path / "cgroup.procs").write_text(
            "".join(f"{process.pid}\n" for process in sleepers))
        opened, order = {}, []
        real_open, real_send = cgroupfs.os.pidfd_open, cgroupfs.signals.pidfd_send_signal

        def pinning(pid, *args):
            fd = real_open(pid, *args)
            opened[fd] = pid
            return fd

        def sending(fd, number):
            order.append(opened[fd])
            real_send(fd, number)

        monkeypatch.setattr(cgroupfs.os, "pidfd_open", pinning)
        monkeypatch.setattr(cgroupfs.signals, "pidfd_send_signal", sending)
        assert cgroupfs.signal_listed([str(tmp_path)], signal.SIGTERM, first=main) == 4
        assert order[0] == main, order
    finally:
        for process in sleepers:
            process.kill()
            process.wait()

