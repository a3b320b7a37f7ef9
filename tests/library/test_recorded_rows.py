"""Rows of benches that write their own block of docs/benchmarks.md
(bench/recorded.py): a block replaces its bench's last one, others stay, and
the report's regeneration carries every block over."""

import os
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")
sys.path.insert(0, BENCH_DIR)

import recorded  # noqa: E402
from targets import Row  # noqa: E402


def make(name, value, tmp_path):
    row = Row("-", "p99 under flood", f"{value} ms", "quiet p99", "1.00 ms", f"{value:.2f}×",
              "≤ 2×", value <= 2)
    return recorded.block(name, f"{name} title", f"python bench/{name}.py --record", [row],
                          "How it was measured.", ["a note"], workdir=str(tmp_path))


def test_record_appends_then_replaces_only_its_own_block(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\nGenerated rows.\n")
    recorded.record("fairness", make("fairness", 3.0, tmp_path), str(report))
    recorded.record("reload", make("reload", 1.5, tmp_path), str(report))
    recorded.record("fairness", make("fairness", 1.5, tmp_path), str(report))
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nGenerated rows.\n")
    assert text.count(recorded.HEADING) == 1
    found = recorded.blocks(text)
    assert [block.splitlines()[1] for block in found] == ["### fairness title", "### reload title"]
    assert "| 1.5 ms |" in found[0] and "| 3.0 ms |" not in text
    assert "| met |" in found[0] and "**not met**" not in found[0]
    assert "- **commit**:" in found[0] and "- a note" in found[0]


def test_regeneration_carries_every_block(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n")
    recorded.record("fleet", make("fleet", 2.5, tmp_path), str(report))
    carried = recorded.carried(str(report))
    assert carried.startswith(recorded.HEADING)
    assert recorded.blocks(carried) == recorded.blocks(report.read_text())
    assert recorded.carried(str(tmp_path / "absent.md")) == ""
