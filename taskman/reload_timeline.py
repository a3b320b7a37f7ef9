"""A reload's timeline: when each of its steps happened, logged by the new image.

A reload spans two images of one process: the old one checks, pauses,
stops and hands over (taskman.reloading), the new one imports, adopts and
listens (taskman.cli.server, taskman.server). Each step is marked with
``time.monotonic()``, which the exec does not reset; the old image passes
its marks to the new one in the environment (``VARIABLE``, removed on
arrival so no task sees it), and the new image logs them all in one line,
as seconds after the SIGHUP. So every reload says where its time went,
without a profiler, on the machine where it was slow.
"""

import os
import time
from typing import List, Optional, Tuple

VARIABLE = "TASKMAN_RELOAD_TIMELINE"

_marks: List[Tuple[str, float]] = []


def start() -> None:
    """SIGHUP came: a new timeline."""
    _marks.clear()
    mark("sighup")


def mark(step: str) -> None:
    _marks.append((step, time.monotonic()))


def hand_over() -> None:
    """Into the environment of the image about to be exec'd."""
    os.environ[VARIABLE] = ",".join(f"{step}={at:.6f}" for step, at in _marks)


def withdraw() -> None:
    """The exec did not happen."""
    os.environ.pop(VARIABLE, None)


def take() -> None:
    """In the new image: the old image's marks before this one's."""
    text = os.environ.pop(VARIABLE, "")
    handed = []
    for item in filter(None, text.split(",")):
        step, _, at = item.partition("=")
        try:
            handed.append((step, float(at)))
        except ValueError:
            return  # not ours to read: no timeline rather than a wrong one
    _marks[:0] = handed


def since_sighup() -> Optional[float]:
    """Seconds since the SIGHUP of this reload, or None outside one."""
    sighup = dict(_marks).get("sighup")
    return None if sighup is None else time.monotonic() - sighup


def summary() -> Optional[str]:
    """``step +seconds`` for each step since the SIGHUP, or None when this
    image was not started by a reload."""
    if not _marks or _marks[0][0] != "sighup":
        return None
    sighup = _marks[0][1]
    return ", ".join(f"{step} {at - sighup:.3f}" for step, at in _marks[1:])
