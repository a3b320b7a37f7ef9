"""The CRL's change signal (taskman.file_watch) and the revocation check
built on it (credentials.Peers): a revoked certificate is refused on its very
next call however the CRL is replaced, and where the watch cannot vouch for
the file the check stats per call as before."""

import fcntl
import os
import shutil
import subprocess
import sys

import pytest

from taskman import credentials, file_watch, pki
from taskman.errors import Unauthenticated


@pytest.fixture
def crl(tmp_path):
    directory = tmp_path / "pki"
    directory.mkdir()
    path = directory / "ca.crl"
    path.write_bytes(b"one")
    return str(path)


@pytest.fixture
def watch(crl):
    made = file_watch.FileWatch(crl)
    assert made.arm(), made.reason
    assert not made.changed()
    yield made
    made.close()


def replace(path, data):
    temporary = path + ".new"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def test_each_way_of_changing_the_file_is_reported_once(watch, crl, tmp_path):
    with open(crl, "r+b") as file:  # in place, not yet closed
        file.write(b"two")
        file.flush()
        assert watch.changed()
        assert not watch.changed()
    assert watch.changed()  # the close
    replace(crl, b"three")
    assert watch.changed() and not watch.changed()
    with open(crl, "ab") as file:  # the new inode is watched too
        file.write(b"!")
    assert watch.changed() and not watch.changed()
    os.utime(crl, (1, 1))
    assert watch.changed() and not watch.changed()
    os.link(crl, str(tmp_path / "elsewhere"))  # a write through another name
    assert watch.changed()
    with open(tmp_path / "elsewhere", "ab") as file:
        file.write(b"?")
    assert watch.changed() and not watch.changed()
    os.unlink(crl)
    assert watch.changed() and not watch.changed()
    with open(crl, "wb") as file:
        file.write(b"back")
    assert watch.changed() and not watch.changed()
    assert watch.armed


def test_other_files_in_the_directory_are_not_reported(watch, crl):
    directory = os.path.dirname(crl)
    replace(os.path.join(directory, "ca.crt"), b"cert")
    with open(os.path.join(directory, "serial"), "wb") as file:
        file.write(b"1")
    assert not watch.changed()
    assert watch.armed


def test_a_directory_removed_or_replaced_disarms_it(crl, tmp_path):
    for change in ("remove", "replace the parent"):
        watch = file_watch.FileWatch(crl)
        assert watch.arm()
        if change == "remove":
            shutil.rmtree(os.path.dirname(crl))
            os.makedirs(os.path.dirname(crl))
        else:
            os.rename(tmp_path, str(tmp_path) + ".old")
            os.makedirs(os.path.dirname(crl))
        assert watch.changed() and not watch.armed and watch.reason
        assert watch.changed(), "a disarmed watch answers True"
        shutil.rmtree(str(tmp_path) + ".old", ignore_errors=True)


@pytest.mark.parametrize("file", ["present", "absent"])
def test_an_overflowing_queue_disarms_it(watch, crl, file):
    directory = os.path.dirname(crl)
    if file == "absent":  # no watch of the file's own: its wd is -1, as an overflow's
        os.unlink(crl)
        assert watch.changed() and not watch.changed()
    for number in range(10000):  # two events each, over the 16,384 queued
        os.close(os.open(os.path.join(directory, f"f{number}"), os.O_CREAT | os.O_WRONLY))
    assert watch.changed() and not watch.armed
    assert "0x4000" in watch.reason


def test_it_does_not_arm_where_it_cannot_vouch_for_the_file(crl, tmp_path, monkeypatch):
    os.symlink(crl, str(tmp_path / "link.crl"))
    os.symlink(os.path.dirname(crl), str(tmp_path / "linked"))
    for path in (tmp_path / "link.crl", tmp_path / "linked" / "ca.crl"):
        watch = file_watch.FileWatch(str(path))
        assert not watch.arm() and "symbolic link" in watch.reason and watch.changed()
    monkeypatch.setattr(file_watch, "LOCAL_FILE_SYSTEMS", frozenset())
    watch = file_watch.FileWatch(crl)
    assert not watch.arm() and "cannot vouch" in watch.reason and watch.fileno() == -1


def test_the_descriptor_is_close_on_exec_and_not_inherited(watch):
    descriptor = watch.fileno()
    assert fcntl.fcntl(descriptor, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    child = subprocess.run([sys.executable, "-c", f"import os; os.fstat({descriptor})"],
                           capture_output=True, close_fds=False)
    assert child.returncode != 0 and b"Bad file descriptor" in child.stderr


# -- Peers: the revocation check before every call

@pytest.fixture(scope="module")
def made_once(tmp_path_factory):
    return pki.PKI.open(str(tmp_path_factory.mktemp("watch-pki") / "pki"), key_size=2048)


@pytest.fixture
def local(made_once, tmp_path):
    return made_once.copy_to(str(tmp_path / "pki"))


def pem(directory, user):
    with open(directory.path(f"{user}.crt"), "rb") as file:
        return file.read()


def revoked_bytes(local, user):
    """The CRL's bytes with ``user`` revoked, the file itself left as it was."""
    with open(local.crl_path, "rb") as file:
        before = file.read()
    local.revoke(user)
    with open(local.crl_path, "rb") as file:
        after = file.read()
    with open(local.crl_path, "wb") as file:
        file.write(before)
    return after


def check_revoked_next_call(peers, local, user, how):
    assert peers.identify(pem(local, user)) == user
    if how != "by the PKI":
        data = revoked_bytes(local, user)
        assert peers.identify(pem(local, user)) == user, "the old CRL is back"
    if how == "in place":
        with open(local.crl_path, "r+b") as file:
            file.truncate(0)
            file.write(data)
    elif how == "by rename":
        replace(local.crl_path, data)
    else:  # taskman pki revoke
        local.revoke(user)
    with pytest.raises(Unauthenticated, match="revoked"):
        peers.identify(pem(local, user))


@pytest.mark.parametrize("how", ["in place", "by rename", "by the PKI"])
def test_a_revocation_is_refused_on_the_very_next_call(local, how):
    peers = credentials.Peers(local.path(pki.CA_CERT), local.crl_path)
    assert peers.watch.armed, peers.watch.reason
    check_revoked_next_call(peers, local, "client001", how)
    assert peers.identify(pem(local, "client002")) == "client002"
    assert peers.watch.armed


@pytest.mark.parametrize("how", ["in place", "by rename"])
def test_without_inotify_it_stats_per_call(local, how, monkeypatch):
    def no_inotify():
        raise AttributeError("no inotify_init1 in this libc")
    monkeypatch.setattr(file_watch, "_get_libc", no_inotify)
    peers = credentials.Peers(local.path(pki.CA_CERT), local.crl_path)
    assert not peers.watch.armed and "inotify" in peers.watch.reason
    check_revoked_next_call(peers, local, "client001", how)


def test_a_lost_watch_falls_back_then_rearms_at_the_next_refresh(local):
    peers = credentials.Peers(local.path(pki.CA_CERT), local.crl_path)
    peers.close()
    check_revoked_next_call(peers, local, "client001", "by rename")
    assert peers.watch.armed, "the reload on the stat's change armed it again"
    peers.close()
    peers.refresh()  # the tick
    assert peers.watch.armed
    check_revoked_next_call(peers, local, "client002", "in place")


def test_a_crl_that_does_not_parse_is_retried_when_written_again(local):
    peers = credentials.Peers(local.path(pki.CA_CERT), local.crl_path)
    data = revoked_bytes(local, "client001")
    with open(local.crl_path, "wb") as file:
        file.write(data[:40])  # half written: refused, the old list stays
        file.flush()
        assert peers.identify(pem(local, "client001")) == "client001"
        assert peers.last_error
        file.write(data[40:])
    with pytest.raises(Unauthenticated, match="revoked"):
        peers.identify(pem(local, "client001"))


def test_a_reload_that_fails_midway_is_tried_again_on_the_next_call(local, monkeypatch):
    peers = credentials.Peers(local.path(pki.CA_CERT), local.crl_path)
    local.revoke("client001")
    reload = peers.check.reload_revocations
    def interrupted(*args):
        monkeypatch.setattr(peers.check, "reload_revocations", reload)
        raise RuntimeError("interrupted")
    monkeypatch.setattr(peers.check, "reload_revocations", interrupted)
    with pytest.raises(RuntimeError):
        peers.identify(pem(local, "client001"))
    assert not peers.watch.changed(), "the event was taken"
    with pytest.raises(Unauthenticated, match="revoked"):
        peers.identify(pem(local, "client001"))
