"""The traced causes of the divergences the matrix shows: for each, the releases it applies to, the
cases and first-failure lines it explains, and the release source line that computes it (found by
`pattern` in that release's own site-packages when the matrix is written, so the line number is the
release's). Traced by diffing each release's AdaLoRA source against 0.21.2's (ports/README.md)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cause:
    key: str
    title: str
    releases: tuple[str, ...]  # row names ("peft 0.4.0") it applies to
    cases: tuple[str, ...]  # case id globs
    first_failure: str  # a regex the runner's first failure line must match ("" matches any)
    file: str  # the release's file, relative to site-packages
    pattern: str  # a fragment of the causing line, located in the release's file
    quote: str  # the line, in a few words
    why: str
    other_files: tuple[str, ...] = field(default=())  # where the file moved in other releases


CAUSES: list[Cause] = []


def causes_for(row: str, case_id: str, first_line: str) -> Cause | None:
    """The first cause that applies to `row` and explains `case_id`'s failure, if any."""
    for cause in CAUSES:
        applies = row in cause.releases and any(fnmatch.fnmatchcase(case_id, g) for g in cause.cases)
        if applies and re.search(cause.first_failure, first_line):
            return cause
    return None
