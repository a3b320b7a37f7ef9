"""taskman-server with measured variants patched in (the first reports'
proposed fixes, docs/benchmark-history.md "2026-11-26", and per-call pieces).

For before/after numbers before a fix lands in the library:

    FIXES=slots,empty python bench/run.py --server bench/patched_server.py ...

FIXES is a comma-separated subset of the proposals not (yet) in the library
(``pump`` and ``thread`` landed in commit 4b24a6a and were removed here):
  slots   at most 64 streams hold a chunk in flight at once
  empty   answer HierarchyDriver.is_empty from the unified group alone
The others take one piece off every call's path, to measure what it costs
(#20 target 3: GetTaskStatus against a bare unary call):
  nolog      no log line per call (the taskman.service logger at WARNING)
  noaudit    no audit record per call (AuditLog.call does nothing)
  noversion  no version header per call
  sendversion  the version header in a batch of its own before the reply
             (context.send_initial_metadata, as before commit 4c438f0)
  stamp      the revocation list's file stat once a second, not per call
  noturns    no call turns (CallTurns.take grants at once)
  chunk256   output streamed in messages of up to 256 KiB, not 64 KiB
  chunk64    output streamed in messages of 64 KiB, however few read
The patches replace library functions at start-up; nothing on disk changes.
"""

import os
import sys

from taskman import tls

# As taskman-server's main does, before grpc or the patched modules load.
tls.restrict_to_tls13()
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
from gevent import monkey  # noqa: E402

monkey.patch_all()

import gevent  # noqa: E402
import gevent.lock  # noqa: E402

FIXES = [name for name in os.environ.get("FIXES", "").split(",") if name and name != "none"]
SLOTS = 64
SLOT_TIMEOUT = 1.0  # a send not done by then is a stalled reader: give its slot back


def patch_slots() -> None:
    from taskman.service import TaskManagerServicer

    original = TaskManagerServicer.StreamTaskOutput
    slots = gevent.lock.BoundedSemaphore(SLOTS)

    def StreamTaskOutput(self, request, context):  # noqa: N802 (gRPC's name)
        inner = original(self, request, context)
        try:
            while True:
                slots.acquire()
                held = [True]

                def give_back(held=held):
                    if held[0]:
                        held[0] = False
                        slots.release()

                try:
                    message = next(inner)
                except BaseException:
                    give_back()
                    return_or_raise = sys.exc_info()[0] is StopIteration
                    if return_or_raise:
                        return
                    raise
                timer = gevent.get_hub().loop.timer(SLOT_TIMEOUT)
                timer.start(give_back)
                try:
                    yield message  # resumes once gRPC has sent it
                finally:
                    timer.close()
                    give_back()
        finally:
            inner.close()

    TaskManagerServicer.StreamTaskOutput = StreamTaskOutput


def patch_empty() -> None:
    from taskman.cgroups import cgroupfs
    from taskman.cgroups.hierarchy import HierarchyDriver

    original = HierarchyDriver.is_empty

    def is_empty(self, group):
        for hierarchy, directory in self._pairs(group):
            if hierarchy.version == 2:
                events = os.path.join(directory, "cgroup.events")
                if cgroupfs.exists(events):
                    return not cgroupfs.keyed(events).get("populated", 0)
        return original(self, group)

    HierarchyDriver.is_empty = is_empty


def patch_nolog() -> None:
    import logging

    logging.getLogger("taskman.service").setLevel(logging.WARNING)


def patch_noaudit() -> None:
    from taskman.audit import AuditLog

    AuditLog.call = lambda self, *args, **kwargs: None


def patch_noversion() -> None:
    from taskman import guard

    guard.send_version_with_replies = lambda: False
    guard._send_version = lambda context: None


def patch_sendversion() -> None:
    from taskman import guard

    guard.send_version_with_replies = lambda: False


def patch_stamp() -> None:
    import time

    from taskman.credentials import Peers

    original = Peers.identify
    checked = {}

    def identify(self, pem):
        now = time.monotonic()
        if now - checked.get(id(self), 0.0) < 1.0:
            return self.check.identify(pem)
        checked[id(self)] = now
        return original(self, pem)

    Peers.identify = identify


def patch_noturns() -> None:
    from taskman.turns import CallTurns

    CallTurns.take = lambda self, user: (lambda: None)


def patch_chunk256() -> None:
    from taskman import output

    defaults = list(output.OutputLog.chunks.__defaults__)
    defaults[-1] = 256 * 1024  # chunk_size, the last keyword
    output.OutputLog.chunks.__defaults__ = tuple(defaults)


def patch_chunk64() -> None:
    from taskman import output

    output.chunk_size = lambda: 64 * 1024


PATCHES = {"chunk256": patch_chunk256, "chunk64": patch_chunk64, "slots": patch_slots,
           "empty": patch_empty, "nolog": patch_nolog,
           "noaudit": patch_noaudit, "noversion": patch_noversion,
           "sendversion": patch_sendversion, "stamp": patch_stamp, "noturns": patch_noturns}

if __name__ == "__main__":
    for name in FIXES:
        PATCHES[name]()
    print(f"patched_server: fixes {FIXES or 'none'}", file=sys.stderr, flush=True)
    from taskman.cli.server import main

    sys.exit(main(sys.argv[1:]))
