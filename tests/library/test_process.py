"""taskman.host's start identity, which every start reads for crash recovery."""

import os

from taskman import host


def test_start_identity_reads_the_boot_id_once(tmp_path, monkeypatch):
    # The boot id cannot change while the server lives; reading /proc/sys
    # at every start cost a third of the identity's time.
    boot = tmp_path / "boot_id"
    boot.write_text("first-boot\n")
    monkeypatch.setattr(host, "BOOT_ID", str(boot))
    monkeypatch.setattr(host, "_boot_id", [], raising=False)
    identity = host.start_identity(os.getpid())
    boot.write_text("second-boot\n")
    assert host.start_identity(os.getpid()) == identity
    assert identity.startswith("first-boot/") and identity.split("/")[1].isdigit()


def test_start_identity_of_a_missing_process_is_empty():
    assert host.start_identity(2 ** 22 + 1) == ""
