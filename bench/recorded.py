"""Target rows measured by benches of their own (fair sharing, fleet, reload),
kept in docs/benchmarks.md between markers of their own.

Those benches need set-ups bench/run.py does not make (a flooding user, a NATS
cluster, 1,000 tasks reloaded three times), so each writes its block when run
with ``--record``, with the date, machine and commit of that run. bench/run.py
regenerates the rest of the report and carries the blocks over unchanged, so a
row is never silently lost and never passes for a newer measurement than it is.
"""

import os
import re
from typing import Iterable, List, Optional

import common
import machine
from targets import HEADER, Row

REPORT = os.path.join(common.REPO_DIR, "docs", "benchmarks.md")
HEADING = "## Measured by benches of their own"
INTRODUCTION = (
    "Each block below was written by the bench it names, run with `--record` (not by "
    "`bench/run.py`, which carries the blocks over when it rewrites the rest of this file); "
    "its date, machine and commit are its own. Its ratios compare measurements taken side by "
    "side in that bench's run.")
_BLOCK = re.compile(r"<!-- recorded:(?P<name>[a-z-]+) -->\n.*?<!-- /recorded:(?P=name) -->\n",
                    re.S)
MACHINE_KEYS = ("date", "cpus", "kernel", "load", "cgroups", "python", "versions", "commit")


def block(name: str, title: str, command: str, rows: Iterable[Row], method: str,
          notes: Iterable[str] = (), workdir: Optional[str] = None) -> str:
    """One bench's block: its heading, when and where it ran, its rows, how."""
    info = machine.machine(workdir or os.getcwd())
    lines = [f"<!-- recorded:{name} -->", f"### {title}", ""]
    lines.append(f"Recorded by `{command}`.")
    lines.append("")
    lines += [f"- **{key}**: {info[key]}" for key in MACHINE_KEYS if key in info]
    lines += ["", HEADER]
    lines += [row.markdown() for row in rows]
    lines += ["", method]
    notes = list(notes)
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    lines += ["", f"<!-- /recorded:{name} -->"]
    return "\n".join(lines) + "\n"


def blocks(text: str) -> List[str]:
    """The recorded blocks found in a report's text, in their order."""
    return [match.group(0) for match in _BLOCK.finditer(text)]


def carried(path: str = REPORT) -> str:
    """The section bench/run.py appends: the blocks of the report it replaces."""
    try:
        with open(path) as handle:
            found = blocks(handle.read())
    except OSError:
        return ""
    if not found:
        return ""
    return "\n".join([HEADING, "", INTRODUCTION, ""] + found)


def record(name: str, text: str, path: str = REPORT) -> None:
    """Put one bench's block in the report: in place of its last one, or appended."""
    try:
        with open(path) as handle:
            report = handle.read()
    except FileNotFoundError:
        report = "# Benchmarks\n"
    pattern = re.compile(rf"<!-- recorded:{re.escape(name)} -->\n.*?"
                         rf"<!-- /recorded:{re.escape(name)} -->\n", re.S)
    if pattern.search(report):
        report = pattern.sub(lambda _match: text, report, count=1)
    else:
        if HEADING not in report:
            report = report.rstrip("\n") + "\n\n" + HEADING + "\n\n" + INTRODUCTION + "\n"
        report = report.rstrip("\n") + "\n\n" + text
    with open(path + ".tmp", "w") as handle:
        handle.write(report)
    os.replace(path + ".tmp", path)
