"""python -m mutation run | report | check: see mutation/README.md."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from adalora_ref._files import write_atomically

from . import report, session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mutation", description="Mutation testing of the reference")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="mutate the math modules, run conform on each mutant, write the report")
    run.add_argument("--module", action="append", choices=session.MODULES, help="only this module (repeatable)")
    run.add_argument("--sample", type=int, help="run only this many mutants, a fixed seeded choice")
    run.add_argument("--rev", default="HEAD", help="the git revision to mutate (default HEAD)")
    run.add_argument("--workdir", type=Path, help="where the scratch copy goes (default: a new temporary directory)")
    commands.add_parser("report", help="rewrite REPORT.md from results.json and survivors.toml")
    commands.add_parser("check", help="exit 1 if a survivor of results.json is not classified in survivors.toml")
    gate = commands.add_parser("gate", help="run the fixed mutants of gate.txt: exit 1 unless conform kills all")
    gate.add_argument("--workdir", type=Path, help="where the scratch copy goes (default: a new temporary directory)")
    gate.add_argument("--rev", help="mutate this git revision (default: the working tree, no git needed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "report":
            return _report()
        if args.command == "gate":
            return _gate(args)
        return _check()
    except (session.MutationError, report.ClassificationError) as err:
        print(f"mutation: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.sample is not None and args.sample < 1:
        raise session.MutationError(f"--sample must be at least 1, got {args.sample}")
    modules = args.module or list(session.MODULES)
    started = time.monotonic()
    # the revision mutated, read before the run: commits made while it runs are not in it
    rev = subprocess.run(["git", "-C", str(session.ROOT), "rev-parse", "--short", args.rev], capture_output=True)
    done = session.run(modules, rev=args.rev, sample=args.sample, workdir=args.workdir)

    what = "all of them" if args.sample is None else f"a seeded sample of {args.sample}"
    run_info = {
        "rev": rev.stdout.decode().strip() or args.rev,
        "cosmic_ray": version("cosmic-ray"),
        "modules": modules,
        "selected": len(done.mutants),
        "of_operators": done.of_operators,
        "total": done.total,
        "what": what,
        "cases": done.cases,
        "conform_seconds": done.conform_seconds,
        "wall_minutes": round((time.monotonic() - started) / 60, 1),
    }
    write_atomically(report.RESULTS, report.results_json(run_info, done.mutants))
    return _report()


def _report() -> int:
    run_info, mutants = report.read_results()
    classes = report.read_classes()
    write_atomically(report.REPORT, report.render(run_info, mutants, classes).encode())
    row = report.scores(mutants)["all"]
    survivors = sum(m.outcome == "survived" for m in mutants)
    print(
        f"mutation: {row['run']} mutants, {row['run'] - survivors} killed, {survivors} survived; wrote {report.REPORT}"
    )
    return 0


def _check() -> int:
    _, mutants = report.read_results()
    classes = report.read_classes()
    unclassified = [m for m in mutants if m.outcome == "survived" and m.id not in classes]
    for m in unclassified:
        print(f"unclassified survivor {m.id}: {m.module}:{m.line} {m.before!r} -> {m.after!r}")
    stale = report.stale_classes(mutants, classes)
    if stale:  # after a sample run, most classified survivors were simply not run
        print(f"note: {len(stale)} classified ids are not survivors of this run: {', '.join(stale)}")
    print(f"mutation check: {len(unclassified)} unclassified survivors")
    return 1 if unclassified else 0


def _gate(args: argparse.Namespace) -> int:
    """The CI check: every mutant listed in gate.txt (one id per line, `#` comments) must be killed."""
    ids = {line.split("#")[0].strip() for line in report.GATE.read_text().splitlines()} - {""}
    done = session.run(session.MODULES, rev=args.rev, only=ids, workdir=args.workdir)
    alive = [m for m in done.mutants if m.outcome not in ("killed", "timeout")]
    for m in alive:
        print(f"mutation gate: {m.id} {m.outcome}: {m.module}:{m.line} {m.before!r} -> {m.after!r}")
    print(f"mutation gate: {len(done.mutants) - len(alive)} of {len(done.mutants)} mutants killed")
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
