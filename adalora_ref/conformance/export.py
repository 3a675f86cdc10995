"""`adalora-ref cases`: the golden cases as plain files, for a port that has no use for site-packages.

    adalora-ref cases list [--cases DIR]             the case ids, one a line, with kind, dtype and checks
    adalora-ref cases export DIR [--cases SRC]       copy the bundled cases (or SRC) with their manifest to DIR

An export never removes or changes anything it did not write. The source is verified against its
manifest first, the copy is written into a staging folder beside DIR (`.<DIR name>.export-<random>`)
and verified again, and only then takes DIR's place: DIR is created by one rename, or, when DIR is
an existing empty folder, filled with the staged entries, MANIFEST.json last (so a half-filled DIR
has no manifest and `conform` refuses it). A DIR that is not empty is refused, unless it already
holds exactly these cases (then nothing is written).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

from .._files import write_atomically
from .case import MANIFEST, CaseError, bundled_cases_dir, case_ids, read_case, read_manifest


def export_cases(source: Path, dest: Path) -> int:
    """Copy the verified case directory `source` to `dest`; returns the number of cases written (0: up to date)."""
    listed = sorted(read_manifest(source)["files"])  # every entry a relative path that stays inside (validate.py)
    if dest.exists() and not dest.is_dir():
        raise CaseError(f"{dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        if _same_cases(source, dest):
            return 0
        raise CaseError(f"{dest}: not empty (export into a new or empty folder; nothing there was changed)")
    staging = dest.parent / f".{dest.name}.export-{secrets.token_hex(4)}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()  # mode from the umask, as for every folder a user gets
    try:
        for rel in listed:
            write_atomically(staging / rel, (source / rel).read_bytes())
        write_atomically(staging / MANIFEST, (source / MANIFEST).read_bytes())
        read_manifest(staging)  # the copy is what the manifest says, byte for byte
        if dest.is_dir():  # an existing empty folder: fill it, the manifest last
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):
                os.rename(entry, dest / entry.name)
            staging.rmdir()
        else:
            os.rename(staging, dest)
    finally:
        if staging.exists():  # only ever our own staging folder
            shutil.rmtree(staging)
    return len(case_ids(dest))


def _same_cases(source: Path, dest: Path) -> bool:
    """Whether `dest` is already a verified copy of `source` (same manifest, every file as listed)."""
    try:
        if (dest / MANIFEST).read_bytes() != (source / MANIFEST).read_bytes():
            return False
        read_manifest(dest)
    except (OSError, CaseError):
        return False
    return True


def register_cases(sub: argparse._SubParsersAction) -> None:
    """Add `cases list` and `cases export` to the `adalora-ref` command line."""
    parser = sub.add_parser("cases", help="list the golden cases, or export them to a folder for a port")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the case ids, with kind, dtype and number of checks")
    listing.add_argument("--cases", type=Path, default=None, help="a directory of cases (default: the bundled ones)")
    listing.set_defaults(func=_run_list)
    export = actions.add_parser("export", help="copy the cases and their MANIFEST.json to a new or empty DIR")
    export.add_argument("dir", type=Path, metavar="DIR", help="where to write the cases (new or empty)")
    export.add_argument("--cases", type=Path, default=None, help="a directory of cases (default: the bundled ones)")
    export.set_defaults(func=_run_export)


def _run_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        root = args.cases if args.cases is not None else bundled_cases_dir()
        read_manifest(root)
        cases = [read_case(root, case_id) for case_id in case_ids(root)]
    except CaseError as err:
        print(f"adalora-ref cases: {err}", file=sys.stderr)
        return 2
    width = max([len(c.id) for c in cases] + [4])
    for c in cases:
        print(f"{c.id:{width}}  {c.kind:10s}  {c.dtype:7s}  {len(c.checks):4d} checks")
    return 0


def _run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        source = args.cases if args.cases is not None else bundled_cases_dir()
        written = export_cases(source, args.dir)
    except CaseError as err:
        print(f"adalora-ref cases export: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"adalora-ref cases export: {err.filename or args.dir}: {err.strerror or err}", file=sys.stderr)
        return 2
    if written == 0:
        print(f"{args.dir}: already holds these cases, unchanged")
    else:
        print(f"{written} cases and {MANIFEST} written to {args.dir}; judge a port with")
        print(f"  adalora-ref conform --cases {args.dir} --port PORT_OUTPUT_DIR")
    return 0
