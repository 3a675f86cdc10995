"""docs/GUIDE.md cites the reference by line ("`update_ipt` (adalora_ref/allocator.py:246-271)"):
each such citation must still point at its name, so that an edit that moves the code shows here
instead of leaving a learner on the wrong line. (The peft and loralib lines it cites are of pinned
releases and do not move.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
GUIDE = (ROOT / "docs" / "GUIDE.md").read_text()
NAMED = re.compile(r"`(?:\w+\.)*(?P<name>\w+)` \(adalora_ref/(?P<file>[\w/]+\.py):(?P<first>\d+)(?:-(?P<last>\d+))?")


def test_the_guide_cites_the_reference_by_name() -> None:
    citations = list(NAMED.finditer(GUIDE))
    assert len(citations) >= 5, "the guide no longer cites the reference as `name` (file:line)"


def test_each_named_citation_of_the_reference_points_at_its_name() -> None:
    wrong = []
    for m in NAMED.finditer(GUIDE):
        lines = (ROOT / "adalora_ref" / m["file"]).read_text().splitlines()
        first, last = int(m["first"]), int(m["last"] or m["first"])
        if not (first <= last <= len(lines)) or m["name"] not in lines[first - 1]:
            found = lines[first - 1].strip()[:60] if first <= len(lines) else "past the end"
            wrong.append(f"{m[0]}: line {first} is {found!r}")
    assert wrong == []
