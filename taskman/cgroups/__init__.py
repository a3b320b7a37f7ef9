"""Per-task resource groups: one driver per kind of host.

The manager sees only the ``Driver`` interface (driver.py). ``select_driver``
(selection.py) detects the host (detect.py) and returns the driver that can
enforce ``Limits`` there: ``v2`` (pure cgroup v2, v2.py), ``hybrid`` (v1
controllers plus the unified v2 hierarchy, hybrid.py) or, only when asked
for, ``none`` (none.py). It refuses (``CgroupError``) rather than silently
running tasks unlimited: fail closed. What v2 and hybrid share is
hierarchy.py; raw cgroup file I/O lives in cgroupfs.py only.
"""

from taskman.cgroups.driver import Driver, Group, Limits
from taskman.cgroups.selection import select_driver
from taskman.errors import CgroupError

__all__ = ["CgroupError", "Driver", "Group", "Limits", "select_driver"]
