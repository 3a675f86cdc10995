"""`adalora-ref conform --junit FILE`: the results as JUnit XML, the format CI systems show natively.

One `<testsuite>` per case kind inside one `<testsuites>`, one `<testcase>` per case:
`classname` is the kind, `name` the case id, `time` the seconds the case took. A failing case
carries `<failure message="<first divergence>">` with the whole diagnosis as its text; a case
whose run failed (no outputs, an unreadable file, an exception) carries `<error>`; a case the port
declared unsupported carries `<skipped message="<reason>"/>`. Every element has the `tests`,
`failures`, `errors` and `skipped` counts GitLab, Jenkins and the GitHub Actions reporters read.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from .report import diagnosis_text
from .results import CaseResult, status_counts

# characters XML 1.0 cannot hold at all (a port's values may contain anything); shown as \xNN instead
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _counts(results: Sequence[CaseResult]) -> dict[str, str]:
    """The attributes of a `<testsuite(s)>`: a failing case whose run failed is an error, not a failure."""
    counts = status_counts(results)
    errors = sum(r.unsupported is None and r.error is not None for r in results)
    failures, skipped = counts["fail"] - errors, counts["unsupported"]
    return {"tests": str(len(results)), "failures": str(failures), "errors": str(errors), "skipped": str(skipped)}


def _testcase(result: CaseResult, seconds: float) -> ET.Element:
    element = ET.Element("testcase", classname=result.kind, name=result.case_id, time=f"{seconds:.3f}")
    if result.unsupported is not None:
        ET.SubElement(element, "skipped", message=_xml_text(result.unsupported))
    elif result.error is not None:
        child = ET.SubElement(element, "error", message=_xml_text(result.error))
        child.text = _xml_text(diagnosis_text(result))
    elif not result.passed:
        child = ET.SubElement(element, "failure", message=_xml_text(result.first_failure or ""), type="divergence")
        child.text = _xml_text(diagnosis_text(result))
    return element


def junit_xml(results: Sequence[CaseResult], seconds: Mapping[str, float], properties: Mapping[str, str]) -> bytes:
    """The JUnit XML document (UTF-8 bytes) for `results`; `seconds` maps case ids to their run time."""
    root = ET.Element("testsuites", name="adalora-ref conform", **_counts(results))
    root.set("time", f"{sum(seconds.get(r.case_id, 0.0) for r in results):.3f}")
    for kind in dict.fromkeys(r.kind for r in results):  # kinds in the order the cases ran
        members = [r for r in results if r.kind == kind]
        suite = ET.SubElement(root, "testsuite", name=kind, **_counts(members))
        suite.set("time", f"{sum(seconds.get(r.case_id, 0.0) for r in members):.3f}")
        props = ET.SubElement(suite, "properties")
        for name, value in properties.items():
            ET.SubElement(props, "property", name=name, value=_xml_text(value))
        suite.extend(_testcase(r, seconds.get(r.case_id, 0.0)) for r in members)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
