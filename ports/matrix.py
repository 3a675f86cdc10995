"""docs/PORTS.md from the conform reports of ports/build.py: the compliance matrix (rows: the peft
releases, loralib, the reference; columns: the case kinds; cells: passed / total, and unsupported),
the reasons for unsupported cases, and each divergence with its first failure line and the line of
the release's source that causes it (ports/causes.py). Releases whose results are identical are
grouped."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from causes import Cause, causes_for

from adalora_ref._files import write_atomically
from adalora_ref.conformance.case import KINDS


@dataclass
class Row:
    name: str
    report: Path  # the conform --json report
    source: Path | None  # where the implementation's files are (a release's site-packages, a checkout)
    out: Path | None = None  # the driver's output folder (its driver_log.json has each crashed case's error)


def _load(row: Row) -> dict | None:
    if not row.report.is_file():
        return None
    return json.loads(row.report.read_text())


def _cell(results: list[dict], kind: str) -> str:
    of_kind = [r for r in results if r["kind"] == kind]
    if not of_kind:
        return ""
    judged = [r for r in of_kind if r["status"] != "unsupported"]
    passed = sum(r["status"] == "pass" for r in judged)
    cell = f"{passed} / {len(judged)}" if judged else "-"
    unsupported = len(of_kind) - len(judged)
    return cell + (f" ({unsupported} unsup.)" if unsupported else "")


def _first_line(result: dict, crashes: dict[str, str]) -> str:
    """The runner's first failure line; for a case without outputs, the error the driver logged."""
    text = (result.get("first_failure") or "(no message)").splitlines()[0]
    if text.startswith("no outputs") and result["case"] in crashes:
        return f"no outputs: the release raised {crashes[result['case']].removeprefix('exit 1: ')}"
    return text


def _crashes(row: Row) -> dict[str, str]:
    log = row.out / "driver_log.json" if row.out is not None else None
    return json.loads(log.read_text()).get("failed", {}) if log is not None and log.is_file() else {}


def _signature(results: list[dict]) -> tuple:
    """What two rows must share to be grouped: every case's status and first failure line (a missing
    output's line names the row's own folder, so only that it is missing counts)."""

    def first(r: dict) -> str | None:
        text = r.get("first_failure")
        return "no outputs" if text is not None and text.startswith("no outputs") else text

    return tuple((r["case"], r["status"], first(r), (r.get("unsupported") or "").split(" ", 2)[-1]) for r in results)


def site_packages(venv: Path) -> Path | None:
    """A virtual environment's site-packages folder (None when there is none)."""
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if found else None


def _locate(cause: Cause, site: Path | None) -> str:
    """`peft/tuners/adalora.py:412` for the first line of the implementation's file holding the
    cause's pattern (found in its own files: a release's site-packages, a checkout), or the file
    marked untraced when the pattern is not there."""
    if site is None:
        return f"{cause.file} (no source folder to look in: untraced)"
    for candidate in [cause.file, *cause.other_files]:
        path = site / candidate
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if cause.pattern in line:
                    return f"{candidate}:{number}"
    return f"{cause.file} (pattern not found: untraced)"


def write_matrix(path: Path, rows: list[Row], command: str, *, loralib_given: bool) -> None:
    lines = [
        "# Known implementations: the compliance matrix",
        "",
        f"Rebuilt by `{command}` (ports/README.md). Each row is one implementation run as a port on the",
        "golden cases (docs/SPEC.md 15-16) and judged by `adalora-ref conform --port OUT --json`; a cell",
        "is the cases passed / judged, with the cases the implementation cannot express (declared in its",
        "port.json, reasons below) counted apart. Rows with identical results are grouped.",
        "",
    ]
    loaded = [(row, _load(row)) for row in rows]
    groups: dict[tuple, list[tuple[Row, dict]]] = defaultdict(list)
    missing = []
    for row, report in loaded:
        if report is None:
            missing.append(row)
        else:
            groups[_signature(report["results"])].append((row, report))
    header = "| implementation | " + " | ".join(KINDS) + " | all |"
    lines += [header, "|" + " --- |" * (len(KINDS) + 2)]
    for members in groups.values():
        results = members[0][1]["results"]
        names = ", ".join(row.name for row, _ in members)
        cells = [_cell(results, kind) for kind in KINDS]
        counts = members[0][1]["counts"]
        total = f"{counts['pass']} / {counts['pass'] + counts['fail']}"
        if counts["unsupported"]:
            total += f" ({counts['unsupported']} unsup.)"
        lines.append(f"| {names} | " + " | ".join(cells) + f" | {total} |")
    lines.append("")
    for row in missing:
        note = "not built: run with --loralib PATH" if "loralib" in row.name and not loralib_given else "no report"
        error = row.report.with_suffix(".error")
        if error.is_file():
            note = error.read_text().strip()
        lines.append(f"- {row.name}: {note}")
    lines += ["", "## Unsupported cases, with the reasons the implementations give", ""]
    for members in groups.values():
        reasons: dict[str, list[str]] = defaultdict(list)
        for r in members[0][1]["results"]:
            if r["status"] == "unsupported":
                reasons[r["unsupported"]].append(r["case"])
        if reasons:
            lines.append(f"- {', '.join(row.name for row, _ in members)}:")
            for reason, ids in reasons.items():
                lines.append(f"  - {reason} ({len(ids)}: {_short_list(ids)})")
    lines += ["", "## Divergences and their causes", ""]
    for members in groups.values():
        failing = [r for r in members[0][1]["results"] if r["status"] == "fail"]
        if not failing:
            continue
        row = members[0][0]
        crashes = _crashes(row)
        lines += [f"### {', '.join(m.name for m, _ in members)}: {_cases(len(failing))} fail", ""]
        by_cause: dict[str, list[dict]] = defaultdict(list)
        untraced = []
        for r in failing:
            found = causes_for(row.name, r["case"], _first_line(r, crashes))
            if found:
                by_cause[found.key].append(r)
            else:
                untraced.append(r)
        for key, results in by_cause.items():
            first = _first_line(results[0], crashes)
            cause = causes_for(row.name, results[0]["case"], first)
            assert cause is not None and cause.key == key
            named = len(members) > 1  # grouped releases: each line with its release, as line numbers differ
            places = [_locate(cause, m.source) + (f" ({m.name})" if named else "") for m, _ in members]
            lines += [
                f"- **{cause.title}** ({_cases(len(results))}: {_short_list([r['case'] for r in results])})",
                f"  - first failure (`{results[0]['case']}`): `{first}`",
                f"  - cause: `{'`, `'.join(places)}`: `{cause.quote}`. {cause.why}",
            ]
        for r in untraced:
            lines += [
                f"- **untraced**: `{r['case']}`",
                f"  - first failure: `{_first_line(r, crashes)}`",
                "  - why untraced: no cause in ports/causes.py matches this failure yet",
            ]
        lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    write_atomically(path, re.sub(r"\n{3,}", "\n\n", text).encode())


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _short_list(ids: list[str], keep: int = 4) -> str:
    shown = ", ".join(ids[:keep])
    return shown + (f", ... ({len(ids) - keep} more)" if len(ids) > keep else "")
