"""Fuzzed manifests, case JSONs and case tensors either load or are refused with a CaseError, never
another exception and never a file opened outside the cases folder; the counts are printed at the
end of the module (`-s`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_ref.conformance.case import (
    MANIFEST,
    CaseError,
    read_case,
    write_case,
    write_manifest,
)
from adalora_ref.conformance.runner import run_cases

from .test_case_integrity import CASES, PROVENANCE, opened_outside

# --- fuzzing: every input loads or is refused with a CaseError ------------------------------------

FUZZ: dict[str, Counter[str]] = {"manifest": Counter(), "case": Counter(), "tensors": Counter()}


@pytest.fixture(scope="module", autouse=True)
def _report_fuzz_counts() -> Iterator[None]:
    yield
    for reader, counts in FUZZ.items():
        if counts:
            print(
                f"\nfuzz {reader}: {sum(counts.values())} inputs tried, {counts['loaded']} loaded, "
                f"{counts['refused']} refused with a CaseError, {counts['other']} other exceptions"
            )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cases (one with extra files) and a file outside the folder for paths to aim at; judged once,
    so that the fuzzed runs import nothing (an import opens module files outside the folder)."""
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "cases"
    for case_id in ("orth/basic_f64", "checkpoint/trained_and_saved"):
        case = read_case(CASES, case_id)
        write_case(root, case, {name: path.read_bytes() for name, path in case.files.items()})
    write_manifest(root, PROVENANCE)
    (base / "outside.json").write_text("{}")
    assert all(result.passed for result in run_cases(root))  # and every module the cases need is imported
    return root


PATHS = ["..", "../outside.json", "../../outside.json", "/etc/hostname", "a/../b", "./x", "a//b", "a\\b", "", "\0", "."]
PATHS += ["orth/basic_f64.json", "orth/basic_f64", "adapter_config.json", "x" * 300, "é/ü.json"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(PATHS),
)
WEIRD = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON tree, parents before children."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    """`doc` with one to three places dropped, replaced by a weird value, or given a weird sibling;
    or, one time in eight, text that is not a valid document at all."""
    if draw(st.integers(0, 7)) == 0:
        text = json.dumps(doc)
        return draw(
            st.sampled_from(
                [text[: len(text) // 2], "[" * 100_000 + "]" * 100_000, "1" * 5000, "null", "[]", '"x"', "\udcff"]
            )
        )
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        places = list(_paths(doc))[1:]
        if not places:
            break
        *parent_keys, key = draw(st.sampled_from(places))
        parent = doc
        for k in parent_keys:
            parent = parent[k]
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if action == "drop":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(WEIRD)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from([*PATHS, "checks", "files", "id"]))] = draw(WEIRD)
        else:
            parent.append(draw(WEIRD))
    return json.dumps(doc, allow_nan=True)


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))


def _count(reader: str, attempt: Callable[[], object]) -> None:
    """Run one fuzzed input: it loads, or it raises a CaseError; any other exception fails the test."""
    try:
        attempt()
    except CaseError:
        FUZZ[reader]["refused"] += 1
    except BaseException:
        FUZZ[reader]["other"] += 1
        raise
    else:
        FUZZ[reader]["loaded"] += 1


def _load_checked(root: Path, case_id: str) -> None:
    """Read one case; a loaded case has finite tolerances and finite expected tensors."""
    case = read_case(root, case_id)
    for check in case.checks:
        assert check.rtol is None or math.isfinite(check.rtol)
        if check.type == "tensor":
            assert np.all(np.isfinite(case.expected[check.key]))


FUZZ_SETTINGS = settings(max_examples=250, deadline=None, database=None, derandomize=True)  # reproducible counts


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_manifests_load_or_are_refused(small: Path, data: st.DataObject) -> None:
    manifest = json.loads((small / MANIFEST).read_text())
    original = (small / MANIFEST).read_bytes()
    text = data.draw(mutated(manifest))
    _write(small / MANIFEST, text)
    try:
        with opened_outside(small) as (outside, _):
            _count("manifest", lambda: list(run_cases(small)))  # the manifest, the ids, every case, judged
        assert outside == []
    finally:
        (small / MANIFEST).write_bytes(original)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_case_jsons_load_or_are_refused(small: Path, data: st.DataObject) -> None:
    case_id = data.draw(st.sampled_from(["orth/basic_f64", "checkpoint/trained_and_saved"]))
    path = small / f"{case_id}.json"
    original = path.read_bytes()
    _write(path, data.draw(mutated(json.loads(original))))
    try:
        with opened_outside(small) as (outside, _):
            _count("case", lambda: _load_checked(small, case_id))
        assert outside == []
    finally:
        path.write_bytes(original)


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(data=st.data())
def test_fuzzed_case_tensors_load_or_are_refused(small: Path, data: st.DataObject) -> None:
    path = small / "orth/basic_f64.safetensors"
    original = path.read_bytes()
    cut = data.draw(st.integers(0, len(original)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, min(len(original), 400) - 1), st.integers(0, 255)), max_size=4))
    damaged = bytearray(original[:cut] if data.draw(st.booleans()) else original)
    for index, byte in flips:
        if index < len(damaged):
            damaged[index] = byte
    path.write_bytes(bytes(damaged))
    try:
        _count("tensors", lambda: _load_checked(small, "orth/basic_f64"))
    finally:
        path.write_bytes(original)
