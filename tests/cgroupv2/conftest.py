"""Fixtures for the pure cgroup v2 tests (see guest.py for when they run).

Layout in the VM, mirroring a systemd service with Delegate=yes::

    /sys/fs/cgroup/taskman-vm.service/          the session's own group: +cpu +io +memory +pids
    ├── pytest/                                 pytest waits here between tests (a leaf)
    └── svc-<n>/                                one "service" per test: pytest moves in,
        └── taskman/                            then the real driver moves it on into
            ├── server/                         its leaf and makes task groups beside it
            └── <task id>/

A server must be alone in its cgroup to enable controllers for its children
("no internal processes"), so each test gets a fresh ``svc-<n>`` holding only
pytest, exactly what a service unit gives the real server.
"""

import itertools
import os
import subprocess

import guest
import pytest

VDA_MOUNT = "/mnt/taskman-vda"
_services = itertools.count()


@pytest.fixture(scope="session")
def delegated():
    """Our own cgroup with the four controllers enabled for its children;
    pytest itself moved into the leaf ``<own>/pytest`` first."""
    own = guest.own_cgroup()
    home = own
    if own != guest.CG_ROOT:  # the root may hold processes and still delegate
        home = f"{own}/pytest"
        os.makedirs(home, exist_ok=True)
        for pid in guest.procs(own):
            try:
                guest.write(f"{home}/cgroup.procs", str(pid))
            except OSError:
                pass  # exited meanwhile
    guest.enable_controllers(own)
    return own, home


@pytest.fixture
def service(delegated):
    """A fresh group ``<own>/svc-<n>`` holding only pytest, as a service unit
    holds only its server. Afterwards pytest goes home and the group's tree
    is killed and removed."""
    own, home = delegated
    cg = f"{own}/svc-{os.getpid()}-{next(_services)}"
    os.mkdir(cg)
    guest.move_self(cg)
    yield cg
    guest.move_self(home)
    guest.remove_tree(cg)


@pytest.fixture(scope="session")
def session_pki(tmp_path_factory):
    """One PKI for the run, made with 2048-bit keys: under QEMU's emulation the
    five RSA-4096 keys a server makes at first start took minutes, and timed
    out the start of every end-to-end server on a loaded host. Each server
    gets a copy in its state directory and loads it as a real one."""
    from taskman import pki

    return pki.PKI.open(str(tmp_path_factory.mktemp("pki") / "pki"), key_size=2048)


@pytest.fixture(scope="module")
def vda():
    """In the VM: its scratch disk /dev/vda (254:0) formatted ext4 and mounted
    at /mnt/taskman-vda, so state directories live on a real block device
    (the overlay root has none) and io.max can be proven on it. None elsewhere:
    a real host's disks are never formatted. Per module, so the disk is not
    mounted while test_vm_smoke writes to it raw."""
    disk = os.environ.get("TASKMAN_VM_DISK", "")
    if not (guest.IN_VM and disk == "/dev/vda" and os.path.exists("/sys/block/vda")):
        yield None
        return
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    disk], check=True, timeout=120)
    os.makedirs(VDA_MOUNT, exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", disk, VDA_MOUNT], check=True, timeout=60)
    yield VDA_MOUNT
    if subprocess.run(["umount", VDA_MOUNT], timeout=60).returncode != 0:
        subprocess.run(["umount", "-l", VDA_MOUNT], timeout=60)


@pytest.fixture
def state_dir(vda, tmp_path):
    """The server's state directory: on the VM's disk when there is one."""
    if vda is None:
        path = tmp_path / "state"
        path.mkdir()
        return str(path)
    path = os.path.join(vda, f"state-{os.getpid()}-{next(_services)}")
    os.mkdir(path)
    return path
