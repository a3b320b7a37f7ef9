"""A spawned task's start identity, known from the boot clock around its
spawn (taskman.host.spawned_identity) instead of a read of /proc/<pid>/stat,
which waits for the gate's exec: it must be exactly what start_identity
reads for the same process later (crash recovery compares the two)."""

import os

from gevent.monkey import get_original

from taskman import host, process

# Not gevent's (the tests run patched): nothing here yields to the loop, so
# each child is still there to be read and reaped by this test itself.
_posix_spawn, _waitpid = get_original("os", ["posix_spawn", "waitpid"])


def test_the_identity_from_the_clock_is_the_one_proc_gives():
    determined = 0
    for _ in range(300):
        before = host.boot_clock()
        pid = _posix_spawn("/bin/true", ["/bin/true"], {})
        identity = host.spawned_identity(before, host.boot_clock())
        try:
            if identity:
                determined += 1
                assert identity == host.start_identity(pid)
        finally:
            _waitpid(pid, 0)
    assert determined > 150  # a spawn takes well under a 10 ms tick


def test_no_identity_from_the_clock_across_a_tick():
    tick = 10 ** 9 // os.sysconf("SC_CLK_TCK")
    start = (host.boot_clock() // tick) * tick
    assert host.spawned_identity(start + tick // 2, start + tick // 2 + 1000).endswith(f"/{start // tick}")
    assert host.spawned_identity(start + tick // 2, start + tick + tick // 2) == ""
    # Within the slack of a tick's edge: read /proc rather than guess.
    assert host.spawned_identity(start + 1000, start + tick // 2) == ""
    assert host.spawned_identity(start + tick // 2, start + tick - 1000) == ""


def test_a_spawned_process_carries_the_identity_proc_gives(monkeypatch):
    tick = 10 ** 9 // os.sysconf("SC_CLK_TCK")
    reads, clock = [], []
    real_boot_clock, real_start_identity = host.boot_clock, host.start_identity
    monkeypatch.setattr(host, "boot_clock", lambda: clock.pop(0) if clock else real_boot_clock())
    monkeypatch.setattr(host, "start_identity", lambda pid: reads.append(pid) or real_start_identity(pid))
    for straddle in (False, True):
        now = real_boot_clock()
        # A spawn that straddles a tick: its identity is read from /proc.
        clock[:] = [now - tick // 2, now + tick // 2] if straddle else [now, now + 1000]
        proc = process.spawn("/bin/sleep", ["5"], {"PATH": "/usr/bin:/bin"})
        try:
            assert reads == ([proc.pid] if straddle else [])
            assert proc.start_identity and proc.start_identity == real_start_identity(proc.pid)
        finally:
            reads.clear()
            proc.signal(9)
            proc.wait(10)
            proc.close_output()
