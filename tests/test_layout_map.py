"""docs/architecture.md's module map names every module, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _listed() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Module map", 1)[1]
    listed: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first = row.split("|")[1]
        names = re.findall(r"`([^`]+)`", first)
        # "`lmcd/wire/detect.py`, `registry.py`": later names share the
        # first one's folder.
        folder = names[0].rsplit("/", 1)[0]
        listed.update(n if "/" in n else f"{folder}/{n}" for n in names)
    return listed


def test_every_module_is_in_the_map() -> None:
    modules = {
        str(p.relative_to(ROOT))
        for package in ("lmcd", "lmcd_backends")
        for p in (ROOT / package).rglob("*.py")
    }
    listed = _listed()
    assert sorted(modules - listed) == [], "modules missing from the map"
    assert sorted(listed - modules) == [], "listed modules that do not exist"
