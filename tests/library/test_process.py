"""The start path's dealings with the kernel: the start identity every start
reads for crash recovery (taskman.host), the task's spawn (taskman.process)."""

import os

from taskman import host


def test_start_identity_reads_the_boot_id_once(tmp_path, monkeypatch):
    # The boot id cannot change while the server lives; reading /proc/sys
    # at every start cost a third of the identity's time.
    boot = tmp_path / "boot_id"
    boot.write_text("first-boot\n")
    monkeypatch.setattr(host, "BOOT_ID", str(boot))
    host.boot_id.cache_clear()
    try:
        identity = host.start_identity(os.getpid())
        boot.write_text("second-boot\n")
        assert host.start_identity(os.getpid()) == identity
        assert identity.startswith("first-boot/") and identity.split("/")[1].isdigit()
    finally:
        host.boot_id.cache_clear()  # the real one for the tests after this


def test_start_identity_of_a_missing_process_is_empty():
    assert host.start_identity(2 ** 22 + 1) == ""


def test_a_task_is_watched_once_and_kept_in_no_table_of_gevents():
    # gevent's patched posix_spawn kept each child in a table for 60 s,
    # scanned whole at every child's exit.
    import gevent.os

    from taskman import process

    proc = process.spawn("/bin/true", [], {"PATH": "/usr/bin:/bin"})
    try:
        assert proc.pid not in getattr(gevent.os, "_watched_children", {})
        assert proc.wait(10) == 0
    finally:
        proc.close_output()
