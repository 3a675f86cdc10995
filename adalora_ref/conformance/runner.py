"""`adalora-ref conform`: run golden cases and say, per case, whether the outputs match.

    adalora-ref conform                       the reference against every bundled case
    adalora-ref conform --cases DIR           any directory of cases in the same format
    adalora-ref conform --port DIR            a port's outputs (docs/SPEC.md) against the cases
    adalora-ref conform --kind K --case GLOB  only some cases (both repeatable)
    adalora-ref conform --json report.json    also write the results as JSON
    adalora-ref conform --junit report.xml    also write them as JUnit XML, for a port's CI

A port declares the cases it cannot run in `DIR/port.json` (port.py); those are reported as
unsupported, with the port's reason, and are not failures. Exit status 0 when no case fails, 1
otherwise, 2 for unusable arguments, case files, port.json or report paths (checked before any
case runs; a report that cannot be written at the end, e.g. on a full disk, also exits 2).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._backend import BACKENDS, get_backend
from ..cli_args import load_backend, writable_file, write_output
from .case import KINDS, Case, CaseError, bundled_cases_dir, case_ids, read_case, read_manifest
from .compare import compare
from .junit import junit_xml
from .port import PORT_JSON, read_port_outputs, read_unsupported, unmatched_globs, unsupported_reason
from .reference import run_case
from .report import print_table
from .results import CaseResult, status_counts


def select_case_ids(root: Path, kinds: Sequence[str] | None = None, globs: Sequence[str] | None = None) -> list[str]:
    """The ids under `root` of any kind in `kinds` AND matching any glob in `globs` (None: no filter).

    Refuses (CaseError) an unknown kind, a glob that matches no case, and an empty selection.
    """
    ids = case_ids(root)
    if not ids:
        raise CaseError(f"no cases under {root}")
    for kind in kinds or ():
        if kind not in KINDS:
            raise CaseError(f"--kind {kind!r}: unknown kind; the kinds are {', '.join(KINDS)}")
    for glob in globs or ():
        if not any(fnmatch.fnmatchcase(i, glob) for i in ids):
            raise CaseError(f"--case {glob!r} matches no case under {root} (ids look like {_examples(ids)})")
    of_kind = [i for i in ids if not kinds or i.split("/")[0] in kinds]
    selected = [i for i in of_kind if not globs or any(fnmatch.fnmatchcase(i, g) for g in globs)]
    if not selected:
        wanted = []
        if kinds:
            wanted.append(f"--kind {' / '.join(kinds)}")
        if globs:
            wanted.append(f"--case {' / '.join(globs)}")
        present = ", ".join(dict.fromkeys(i.split("/")[0] for i in ids)) or "none"
        raise CaseError(f"no case under {root} matches {' and '.join(wanted)} (kinds there: {present})")
    return selected


def _examples(ids: Sequence[str]) -> str:
    """A few ids, the first of each kind, to show what a glob is matched against."""
    first_of_kind: dict[str, str] = {}
    for i in ids:
        first_of_kind.setdefault(i.split("/")[0], i)
    return ", ".join(list(first_of_kind.values())[:4])


def run_cases(
    root: Path,
    *,
    port: Path | None = None,
    backend: str = "numpy",
    kinds: Sequence[str] | None = None,
    globs: Sequence[str] | None = None,
    unsupported: Mapping[str, str] | None = None,
) -> Iterator[CaseResult]:
    """Judge the reference (or a port's outputs under `port`) on the selected cases under `root`.

    `unsupported` ({case id glob: reason}) defaults to what `port/port.json` declares. The manifest,
    the selection and port.json are checked when this is called, before the first case runs.
    """
    read_manifest(root)
    ids = select_case_ids(root, kinds, globs)
    xp = None if port is not None else get_backend(backend)
    if unsupported is None:
        unsupported = read_unsupported(port) if port is not None else {}
    return (_run_one(read_case(root, case_id), xp, port, unsupported) for case_id in ids)


def _run_one(case: Case, xp: Any, port: Path | None, unsupported: Mapping[str, str]) -> CaseResult:
    """`case` judged, unless port.json declares it unsupported."""
    reason = unsupported_reason(case.id, unsupported)
    return judge_case(case, xp, port) if reason is None else _not_judged(case, unsupported=reason)


def judge_case(case: Case, xp: Any, port: Path | None) -> CaseResult:
    """`case` judged on the port's outputs under `port`, else on the reference's on backend `xp`.

    Outputs that cannot be had (none written, an unreadable file, the reference raising) make the
    case's `error`, reported under it, not a crash of the run.
    """
    try:
        outputs = read_port_outputs(port, case) if port is not None else run_case(case, xp)
    except (CaseError, FileNotFoundError) as err:
        return _not_judged(case, error=str(err))
    except Exception as err:
        return _not_judged(case, error=f"{type(err).__name__}: {err}")
    return compare(case, outputs)


def _not_judged(case: Case, *, error: str | None = None, unsupported: str | None = None) -> CaseResult:
    """The result of a case whose outputs were not compared: its run failed, or the port does not run it."""
    return CaseResult(case.id, case.kind, case.dtype, n_checks=len(case.checks), error=error, unsupported=unsupported)


def register_conform(sub: argparse._SubParsersAction) -> None:
    """Add `conform` and its options to the `adalora-ref` command line."""
    parser = sub.add_parser("conform", help="check the reference, or a port's outputs, against the golden cases")
    parser.add_argument(
        "--cases", type=Path, default=None, metavar="DIR", help="a directory of cases (default: the bundled ones)"
    )
    parser.add_argument(
        "--port", type=Path, default=None, metavar="DIR", help="a directory of a port's outputs to judge"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="numpy", help="array library for the reference")
    parser.add_argument(
        "--kind", action="append", default=None, help=f"only cases of this kind (repeatable): {', '.join(KINDS)}"
    )
    parser.add_argument(
        "--case",
        action="append",
        default=None,
        dest="globs",
        metavar="GLOB",
        help="only case ids matching GLOB, e.g. 'allocator/*_64' (repeatable; with --kind, both must match)",
    )
    parser.add_argument(
        "--json", type=writable_file, default=None, dest="json_path", metavar="FILE", help="also write a JSON report"
    )
    parser.add_argument(
        "--junit",
        type=writable_file,
        default=None,
        dest="junit_path",
        metavar="FILE",
        help="also write a JUnit XML report",
    )
    parser.set_defaults(func=lambda args, _top: _run_conform(args, parser))  # errors name `conform`


def _run_conform(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`adalora-ref conform`: run the selection, print the table, write the reports; the exit status."""
    results: list[CaseResult] = []
    seconds: dict[str, float] = {}
    try:
        root = args.cases if args.cases is not None else bundled_cases_dir()
        if args.port is not None and not args.port.is_dir():
            parser.error(f"--port {args.port}: not a directory")
        if args.port is None:  # the reference runs: its backend must load (one line and exit 2, as every command)
            load_backend(parser, args.backend)
        unsupported = read_unsupported(args.port) if args.port is not None else {}
        selected = run_cases(
            root, port=args.port, backend=args.backend, kinds=args.kind, globs=args.globs, unsupported=unsupported
        )
        start = time.perf_counter()
        for result in selected:
            results.append(result)
            now = time.perf_counter()
            seconds[result.case_id], start = now - start, now
            if sys.stderr.isatty():  # progress while the cases run
                print(f"\r{len(results)} cases run, last {result.case_id:40s}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        for glob in unmatched_globs(unsupported, case_ids(root)):  # most likely a typo in port.json
            print(f"adalora-ref conform: warning: {args.port / PORT_JSON}: {glob!r} matches no case", file=sys.stderr)
    except (CaseError, ImportError) as err:
        print(f"adalora-ref conform: {err}", file=sys.stderr)
        return 2
    print_table(results, sys.stdout)
    subject = str(args.port) if args.port else f"adalora_ref ({args.backend})"
    # the paths were checked writable when parsed; a full disk now still ends in one line, exit 2
    if args.json_path is not None:
        write_output(parser, "--json", args.json_path, _json_report(results, root, subject))
    if args.junit_path is not None:
        properties = {"subject": subject, "cases_dir": str(root)}
        write_output(parser, "--junit", args.junit_path, junit_xml(results, seconds, properties))
    return 0 if status_counts(results)["fail"] == 0 else 1


def _json_report(results: Sequence[CaseResult], root: Path, subject: str) -> bytes:
    """The `--json` report (docs/SPEC.md section 16): the counts and every result."""
    counts = status_counts(results)
    report = {
        "cases_dir": str(root),
        "subject": subject,
        "passed": counts["fail"] == 0,
        "counts": counts,
        "results": [r.to_json() for r in results],
    }
    return (json.dumps(report, indent=1) + "\n").encode()
