"""docs/SPEC.md's figures about the bundled golden cases are the cases' own: the total and the file
count of 13.1, its kind order, the case counts and names in the headings of section 14, and the
seeds of section 17, each parsed from SPEC and checked against golden/cases, so none goes stale."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adalora_ref.conformance.case import KINDS, bundled_cases_dir, case_ids, read_case, read_manifest

SPEC = (Path(__file__).parents[1] / "docs" / "SPEC.md").read_text()
CASES = bundled_cases_dir()
IDS = case_ids(CASES)
HEADING = re.compile(r"^### 14\.\d+ `(?P<kind>\w+)` \((?P<count>\d+) cases?(?P<rest>[^)]*)\)$", re.MULTILINE)


def section(number: str) -> str:
    """The text of SPEC section `number` ("13.1", "17"), up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(number)}\.? .*?$(?P<body>.*?)(?=^#+ \d)", SPEC, re.MULTILINE | re.DOTALL)
    assert match, f"SPEC has no section {number}"
    return " ".join(match["body"].split())


def names_of(kind: str) -> list[str]:
    return sorted(i.split("/", 1)[1] for i in IDS if i.split("/")[0] == kind)


def test_total_and_file_count_of_13_1() -> None:
    size = r"The bundled set (?:\([^)]*\) )?has (\d+) cases: (\d+) files listed in the manifest"
    match = re.search(size, section("13.1"))
    assert match, "13.1 no longer states the bundled set's size"
    files = read_manifest(CASES)["files"]
    assert (int(match[1]), int(match[2])) == (len(IDS), len(files))


def test_kind_order_of_13_1_is_the_runners() -> None:
    match = re.search(r"in kind order (.*?), then by id", section("13.1"))
    assert match, "13.1 no longer states the kind order"
    stated = re.findall(r"`(\w+)`", match[1])
    assert tuple(stated) == KINDS
    in_run_order = list(dict.fromkeys(i.split("/")[0] for i in IDS))
    assert in_run_order == [k for k in KINDS if k in in_run_order]


def test_section_14_has_one_heading_per_kind_in_kind_order() -> None:
    assert tuple(m["kind"] for m in HEADING.finditer(SPEC)) == KINDS


@pytest.mark.parametrize("heading", list(HEADING.finditer(SPEC)), ids=lambda m: m["kind"])
def test_heading_counts_and_names(heading: re.Match) -> None:
    """`(N cases: a, b, c)`: N is the kind's case count; names listed are exactly its cases (with
    `; `_64` and `_32`` every name in both dtypes)."""
    kind, count, rest = heading["kind"], int(heading["count"]), heading["rest"]
    assert count == len(names_of(kind)), f"section 14 says {count} {kind} cases, golden/cases has {len(names_of(kind))}"
    if rest.startswith(":"):
        listed, _, suffixes = rest[1:].partition(";")
        names = [n.strip() for n in listed.split(",")]
        if suffixes:
            names = [f"{n}{s}" for n in names for s in re.findall(r"`(_\w+)`", suffixes)]
        assert sorted(names) == names_of(kind)


def test_seeds_of_section_17() -> None:
    match = re.search(r"`provenance\.seed`: (.*?)\)", section("17"))
    assert match, "17 no longer lists the seeds"
    stated: dict[str, set[int]] = {}
    for part in re.split(r", (?=[a-z_]+ \d)", match[1]):
        kind, _, numbers = part.partition(" ")
        seeds = stated.setdefault(kind, set())
        for item in numbers.split(" and "):
            first, _, last = item.partition("-")
            seeds.update(range(int(first), int(last or first) + 1))
    actual: dict[str, set[int]] = {}
    for case_id in IDS:
        actual.setdefault(case_id.split("/")[0], set()).add(read_case(CASES, case_id).provenance["seed"])
    assert stated == actual


def test_margin_range_of_section_12() -> None:
    match = re.search(r"The bundled margins range from `([\d.e-]+)` to `([\d.e-]+)`", section("12"))
    assert match, "12 no longer states the range of the margins"
    margins = [m for i in IDS for m in read_case(CASES, i).margins.values()]
    assert (float(match[1]), float(match[2])) == (float(f"{min(margins):.2g}"), float(f"{max(margins):.2g}"))


def test_suite_version_of_section_17_is_the_manifests() -> None:
    match = re.search(r"holds `suite_version`, now `([\d.]+)`", section("17"))
    assert match, "17 no longer states the suite's version"
    assert read_manifest(CASES)["provenance"]["suite_version"] == match[1]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_stability_every_file_of_a_published_suite_is_unchanged(version: str) -> None:
    """SPEC 17's rule, mechanically: the files of each published version are all there, byte for byte."""
    frozen = json.loads((Path(__file__).parent / "data" / f"golden_suite_{version}.json").read_text())["files"]
    current = read_manifest(CASES)["files"]
    changed = sorted(rel for rel, digest in frozen.items() if current.get(rel) != digest)
    assert changed == []


def test_section_17_counts_what_each_version_added() -> None:
    match = re.search(r"Version `1\.0` had (\d+) cases; `1\.1` added (\d+).*?`1\.2` added (\d+)", section("17"), re.S)
    assert match, "17 no longer says what the versions hold"
    counts = []
    for version in ("1.0", "1.1"):
        frozen = json.loads((Path(__file__).parent / "data" / f"golden_suite_{version}.json").read_text())["files"]
        counts.append(len({rel for rel in frozen if rel.endswith(".json") and ".files/" not in rel}))
    assert (counts[0], counts[1] - counts[0], len(IDS) - counts[1]) == (int(match[1]), int(match[2]), int(match[3]))
