"""The README stays true to the code: its flag table, its metric table, its two commands."""

from __future__ import annotations

import re
from pathlib import Path

from purged import metrics
from purged.config import build_parser

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def table_rows(heading: str) -> dict[str, list[str]]:
    """The rows of the first table after `heading`, keyed by the first cell's code span."""
    section = README[README.index(heading) :]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        key = re.match(r"`([^`]+)`", cells[0])
        if key:
            rows[key.group(1)] = cells
    return rows


def test_every_flag_is_in_the_readme_with_its_default() -> None:
    rows = table_rows("### Flags")
    actions = [
        a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "version")
    ]
    assert {f"-{a.dest}" for a in actions} == set(rows)
    for action in actions:
        default = rows[f"-{action.dest}"][1]
        expected = f"`{action.default}`" if action.default else '""'
        assert default == expected, action.dest


def test_every_metric_is_in_the_readme_table() -> None:
    rows = table_rows("## Metrics")
    exported = set()
    for family in metrics.REGISTRY.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert exported <= set(rows)
    assert {name for name in rows if not name.endswith("*")} <= exported


def test_the_two_commands_are_demo_then_test_and_ci_runs_the_second() -> None:
    commands = re.findall(r"^\./dev (\w+)", README, flags=re.MULTILINE)
    assert commands[:2] == ["demo", "test"]
    assert "exec ./dev test" in (REPO / ".ci" / "run").read_text()
