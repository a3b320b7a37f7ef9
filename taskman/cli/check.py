"""taskman-server --check: validate a configuration without serving.

One line per check, ``OK`` or ``FAIL``, and exit status 0 only if all are
OK. Nothing is started, created or locked: the cgroup driver is selected
(detection and permission checks) but never set up, since ``setup()`` takes
the root's lock and kills groups it believes stale, which would hit the
tasks of a server running with the same root. Whether one is running is
read from /proc/locks instead. Imports neither grpc nor gevent.

A reload runs this check before it execs the new image (taskman.reload),
while the old image serves, and the new image's first answer waits for
it: then (``for_reload``) it checks what the new image needs to start and
skips what only informs an operator. The file modes are not walked (every
file of the state directory, thousands with many tasks; the new image
secures them at start, so they never stop it) and the demo CA is not
looked for (cryptography's import; the running server warned at its start).
"""

import os
import shutil
import ssl
import time
from typing import Callable, List, Optional, Tuple

from taskman import pki, tls
from taskman.defaults import CERTS_DIR_VARIABLE, default_state_dir
from taskman.errors import TaskmanError

# Below this much free space in the state directory a server soon refuses
# tasks (their output cannot be kept): report it before it happens.
MIN_FREE_BYTES = 100 * 1024 * 1024
EXPIRY_WARNING_DAYS = 30
PROC_LOCKS = "/proc/locks"


class Failed(Exception):
    """A check failed; the message says why, for the operator."""


def run(settings, out=print, for_reload: bool = False) -> int:
    """Run every check against ``settings`` (a taskman.cli.settings.Settings); return 0 or 1.

    ``for_reload``: the checks a reload needs only (see the module's docstring).
    """
    state_dir = os.path.abspath(settings.state_dir or default_state_dir())
    audit_log = os.path.abspath(settings.audit_path(state_dir))
    checks: List[Tuple[str, Callable[[], str]]] = [
        ("certificates", lambda: check_certificates(settings, demo_warning=not for_reload)),
        ("cgroup driver", lambda: check_cgroups(settings, state_dir)),
        ("state directory", lambda: check_state_dir(state_dir)),
        ("audit log", lambda: check_audit_log(audit_log)),
        ("quotas", lambda: describe_quotas(settings.quotas)),
        ("sandbox", lambda: check_sandbox(settings)),
    ]
    if not for_reload:
        checks.append(("file modes", lambda: check_modes((state_dir, audit_log,
                                                          settings.server_key, settings.ca_key))))
    failures = 0
    for name, check in checks:
        try:
            out(f"OK   {name}: {check()}")
        except (Failed, TaskmanError) as error:
            failures += 1
            out(f"FAIL {name}: {error}")
        except OSError as error:
            failures += 1
            out(f"FAIL {name}: {error.strerror or error} ({error.filename or ''})")
    return 1 if failures else 0


# -- certificates

def check_certificates(settings, demo_warning: bool = True) -> str:
    """The generated PKI's days left per certificate, or the fixed files'
    check (see ``check_files``); the demo CA is named as such if
    ``demo_warning``."""
    state_dir = settings.state_dir or default_state_dir()
    fixed = (settings.server_cert or settings.server_key or (settings.ca_cert and not settings.ca_key)
             or os.environ.get(CERTS_DIR_VARIABLE))
    if fixed:
        ca, cert, key = tls.server_files(settings.ca_cert, settings.server_cert,
                                         settings.server_key, state_dir)
        return check_files(ca, cert, key) + (_demo_warning(ca) if demo_warning else "")
    directory = tls.pki_dir(state_dir)
    if not os.path.exists(os.path.join(directory, pki.CA_CERT)):
        return f"no PKI in {directory} yet: the server generates one at its first start"
    home = pki.PKI(directory, pki.Authority(settings.ca_dir or directory),
                   pki.default_server_names(settings.san))
    statuses = home.status()
    expired = [status.name for status in statuses if status.days_left <= 0]
    if expired and "server" in expired:
        raise Failed(f"the server certificate in {directory} has expired")
    lines = "; ".join(f"{status.name} {status.days_left:.1f} days left"
                      + (f" (renew: {status.renew})" if status.renew else "") for status in statuses)
    return f"PKI {directory}: {lines}" + (_demo_warning(home.path(pki.CA_CERT))
                                          if demo_warning else "")


def _demo_warning(ca: str) -> str:
    with open(ca, "rb") as file:
        if pki.trusts_demo_ca(file.read()):
            return ("; WARNING: the demo CA (its key is public): loopback only, the server "
                    "refuses any other address with it")
    return ""


def check_files(ca: str, cert: str, key: str) -> str:
    """Load the files, match key to certificate, verify the certificate
    against the CA (which also checks its dates) in an in-memory handshake."""
    tls.load_pair(ca, cert, key, "server")  # readable, PEM, key matches certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=ca)
    peer = _handshake(server, client)
    not_after = ssl.cert_time_to_seconds(peer["notAfter"])
    days = (not_after - time.time()) / 86400
    subject = dict(item for part in peer.get("subject", ()) for item in part)
    warning = (f"; WARNING: renew within {days:.0f} days" if days < EXPIRY_WARNING_DAYS else "")
    return (f"{cert} (CN={subject.get('commonName', '?')}) matches its key and is signed by "
            f"{ca}; valid until {peer['notAfter']} ({days:.1f} days left){warning}")


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> dict:
    """Handshake ``client`` with ``server`` in memory; the server's certificate as
    the client saw it (verified). Failed if the client rejects it."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(client_in, client_out, server_hostname="taskman-check")
    for _ in range(10):
        done = 0
        for side in (client_side, server_side):
            try:
                side.do_handshake()
                done += 1
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLCertVerificationError as error:
                raise Failed(f"the CA does not verify the server certificate: "
                             f"{error.verify_message or error.reason}") from None
            except ssl.SSLError as error:
                raise Failed(f"TLS handshake with the server certificate failed: "
                             f"{error.reason or error}") from None
        to_server.write(client_out.read())
        client_in.write(to_client.read())
        if done == 2:
            return client_side.getpeercert()
    raise Failed("TLS handshake with the server certificate did not complete")


# -- cgroups and quotas

def describe_quotas(quotas) -> str:
    """Each user's quotas (a taskman.quotas.QuotaLimits) in one line."""
    import dataclasses

    return "per user: " + ", ".join(
        f"{field.name.replace('_', ' ')} {getattr(quotas, field.name) or 'unlimited'}"
        for field in dataclasses.fields(quotas))


def check_cgroups(settings, state_dir: str) -> str:
    """select_driver with the given flags (detection, permissions, devices), never setup()."""
    from taskman.cgroups import select_driver

    driver = select_driver(settings.driver, settings.limits, settings.cgroup_root,
                           io_paths=("/", _existing(state_dir)),
                           slice_limits=settings.slice_limits)
    bases = [hierarchy.base for hierarchy in getattr(driver, "hierarchies", ())]
    holders = sorted({pid for base in bases for pid in [_flock_holder(base)] if pid})
    if holders:
        use = (f"; root in use by a running server (pid {', '.join(map(str, holders))}): "
               f"a second server needs its own --cgroup-root")
    elif bases:
        use = "; root not in use"
    else:
        use = ""
    return driver.describe() + use


def _flock_holder(path: str) -> Optional[int]:
    """The pid holding a flock on ``path`` (as a running server holds its cgroup
    roots), from /proc/locks, without taking the lock; None if none or unknown."""
    try:
        status = os.stat(path)
        with open(PROC_LOCKS) as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 20993 00:26:1 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


# -- the sandbox

def check_sandbox(settings) -> str:
    """The gate is built, the user map reads, the uid range is the host's to give."""
    from taskman import users

    task_users = users.for_server(settings.user_map, settings.uid_range)
    if task_users is None:
        return f"not root: tasks would run as uid {os.geteuid()}, unconfined"
    ids = settings.uid_range
    mapped = ", ".join(f"{identity} -> uid {sandbox.uid}" for identity, sandbox
                       in sorted(task_users.user_map.items()))
    if any(sandbox.uid == 0 for sandbox in task_users.user_map.values()):
        mapped += " (uid 0 runs OUTSIDE the sandbox)"
    return (f"tasks run as uids {ids.start}-{ids.stop - 1} (registry {users.REGISTRY_PATH})"
            + (f"; user map: {mapped}" if mapped else ""))


def check_modes(paths) -> str:
    """Every file of the state directory and every key is closed to tasks."""
    from taskman import private

    problems = private.problems(path for path in paths if path)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise Failed(f"{shown} (taskman-server fixes them at start)")
    return "directories 0700, files 0600 (certificates 0644), owned by uid " + str(os.geteuid())


# -- files

def check_state_dir(path: str) -> str:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise Failed(f"{path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise Failed(f"{path} is not writable by uid {os.geteuid()}")
        where, state = path, "exists, writable"
    else:
        where = _existing(path)
        if not os.access(where, os.W_OK | os.X_OK):
            raise Failed(f"{path} does not exist and cannot be created: {where} is not "
                         f"writable by uid {os.geteuid()}")
        state = f"will be created (in {where})"
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        raise Failed(f"{path}: only {_size(free)} free (at least {_size(MIN_FREE_BYTES)} "
                     f"needed for task output)")
    return f"{path} {state}; {_size(free)} free"


def check_audit_log(path: str) -> str:
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise Failed(f"{path} exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise Failed(f"{path} is not writable by uid {os.geteuid()}")
        return f"{path} exists, appendable ({_size(os.path.getsize(path))})"
    where = _existing(os.path.dirname(path))
    if not os.access(where, os.W_OK | os.X_OK):
        raise Failed(f"{path} cannot be created: {where} is not writable by uid {os.geteuid()}")
    return f"{path} will be created (mode 0600)"


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
