"""docs/ARCHITECTURE.md stays true: every module it lists exists, every module is listed."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vl", "jobs", "tune", "cluster", "benchmarks")


def _listed() -> list[str]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [m.group(1) for line in block.splitlines() if (m := re.match(r"(\S+\.py)\s", line))]


def _modules() -> set[str]:
    return {
        str(p.relative_to(REPO))
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if p.name != "__init__.py"
    }


def test_every_listed_module_exists_and_every_module_is_listed():
    listed = _listed()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    missing = sorted(set(listed) - _modules())
    unlisted = sorted(_modules() - set(listed))
    assert not missing, f"docs/ARCHITECTURE.md lists modules that do not exist: {missing}"
    assert not unlisted, f"modules missing from docs/ARCHITECTURE.md: {unlisted}"
