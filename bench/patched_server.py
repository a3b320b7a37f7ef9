"""taskman-server with the fixes proposed in bench/findings.md patched in.

For before/after numbers before a fix lands in the library:

    FIXES=slots,empty python bench/run.py --server bench/patched_server.py ...

FIXES is a comma-separated subset of the proposals not (yet) in the library
(``pump`` and ``thread`` landed in commit 4b24a6a and were removed here):
  slots   at most 64 streams hold a chunk in flight at once
  empty   answer HierarchyDriver.is_empty from the unified group alone
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


PATCHES = {"slots": patch_slots, "empty": patch_empty}

if __name__ == "__main__":
    for name in FIXES:
        PATCHES[name]()
    print(f"patched_server: fixes {FIXES or 'none'}", file=sys.stderr, flush=True)
    from taskman.cli.server import main

    sys.exit(main(sys.argv[1:]))
