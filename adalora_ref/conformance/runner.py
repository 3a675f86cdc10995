"""`adalora-ref conform`: run golden cases and say, per case, whether the outputs match.

    adalora-ref conform                       the reference against every bundled case
    adalora-ref conform --cases DIR           any directory of cases in the same format
    adalora-ref conform --port DIR            a port's outputs (docs/SPEC.md) against the cases
    adalora-ref conform --json report.json    also write the results as JSON

Exit status 0 when every case passes, 1 otherwise (2 for unusable arguments or case files).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._backend import BACKENDS, get_backend
from .case import Case, CaseError, bundled_cases_dir, case_ids, read_case, read_manifest, write_atomically
from .compare import CaseResult, compare
from .port import read_port_outputs
from .reference import run_case
from .report import print_table


def run_cases(
    root: Path, *, port: Path | None = None, backend: str = "numpy", kinds: Iterable[str] | None = None
) -> Iterable[CaseResult]:
    """Judge the reference (or a port's outputs under `port`) on every case under `root`."""
    read_manifest(root)
    xp = None if port is not None else get_backend(backend)
    wanted = set(kinds) if kinds else None
    for case_id in case_ids(root):
        if wanted is not None and case_id.split("/")[0] not in wanted:
            continue
        case = read_case(root, case_id)
        yield judge_case(case, xp, port)


def judge_case(case: Case, xp: Any, port: Path | None) -> CaseResult:
    try:
        outputs = read_port_outputs(port, case) if port is not None else run_case(case, xp)
    except (CaseError, FileNotFoundError) as err:
        result = CaseResult(case.id, case.kind, case.dtype, n_checks=len(case.checks))
        result.error = str(err)
        return result
    except Exception as err:  # the reference raising is a failure of this case, reported, not a crash
        result = CaseResult(case.id, case.kind, case.dtype, n_checks=len(case.checks))
        result.error = f"{type(err).__name__}: {err}"
        return result
    return compare(case, outputs)


def register_conform(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("conform", help="check the reference, or a port's outputs, against the golden cases")
    parser.add_argument("--cases", type=Path, default=None, help="a directory of cases (default: the bundled ones)")
    parser.add_argument("--port", type=Path, default=None, help="a directory of a port's outputs to judge")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy", help="array library for the reference")
    parser.add_argument("--kind", action="append", default=None, help="only cases of this kind (repeatable)")
    parser.add_argument("--json", type=Path, default=None, dest="json_path", help="also write a JSON report")
    parser.set_defaults(func=_run_conform)


def _run_conform(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        root = args.cases if args.cases is not None else bundled_cases_dir()
        if args.port is not None and not args.port.is_dir():
            parser.error(f"--port {args.port}: not a directory")
        results = []
        for result in run_cases(root, port=args.port, backend=args.backend, kinds=args.kind):
            results.append(result)
            if sys.stderr.isatty():  # progress while the cases run
                print(f"\r{len(results)} cases run, last {result.case_id:40s}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    except (CaseError, ImportError) as err:
        print(f"adalora-ref conform: {err}", file=sys.stderr)
        return 2
    if not results:
        print(f"adalora-ref conform: no cases under {root}", file=sys.stderr)
        return 2
    print_table(results, sys.stdout)
    if args.json_path is not None:
        report = {
            "cases_dir": str(root),
            "subject": str(args.port) if args.port else f"adalora_ref ({args.backend})",
            "passed": all(r.passed for r in results),
            "results": [r.to_json() for r in results],
        }
        write_atomically(args.json_path, (json.dumps(report, indent=1) + "\n").encode())
    return 0 if all(r.passed for r in results) else 1
