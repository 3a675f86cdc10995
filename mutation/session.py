"""One mutation run: a scratch copy of the repository, cosmic-ray driving `adalora-ref conform` on
every mutant of the math modules, and the outcome of each mutant as a plain record.

cosmic-ray (https://cosmic-ray.readthedocs.io, `pip install ".[mutation]"`) writes each mutant into
the file on disk, runs the test command, and restores the file. It does so in a scratch copy made
here (`git archive` of a revision), never in the checkout: other work in the checkout is never
touched, and the copy's `adalora_ref` is the one `python -m adalora_ref.cli` imports there.

Only the mutations listed in OPERATORS are run (each changes one operator or constant to its
nearest wrong neighbour); cosmic-ray's other operators (every binary operator into every other one,
`not` inserted before every condition, ...) are marked skipped, as are the mutants left out of a
`--sample`.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("allocator", "layer", "orth", "optim", "training", "model", "conv")  # adalora_ref/<name>.py
TEST_COMMAND = f"{sys.executable} -m adalora_ref.cli conform"
_BINARY = ("Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div", "Mod_FloorDiv", "Pow_Mul")
_COMPARISON = ("Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Eq_NotEq", "NotEq_Eq", "Is_IsNot", "IsNot_Is")
OPERATORS = (
    *(f"core/ReplaceBinaryOperator_{pair}" for pair in _BINARY),  # also in `+=` and the like
    *(f"core/ReplaceComparisonOperator_{pair}" for pair in _COMPARISON),  # a bound moved, a test negated
    "core/ReplaceUnaryOperator_USub_UAdd",  # a minus sign dropped
    "core/NumberReplacer",  # a numeric constant n as n + 1 and as n - 1
    "core/ReplaceTrueWithFalse",
    "core/ReplaceFalseWithTrue",
)
SAMPLE_SEED = 16  # the seed of `--sample`: the same sample every time for the same code


class MutationError(RuntimeError):
    """The mutation run cannot go on (cosmic-ray missing, the unmutated reference failing conform)."""


@dataclass
class Mutant:
    """One mutant and what conform made of it."""

    id: str  # stable while the line's text, its function and the operator stay the same
    module: str  # adalora_ref/<name>.py
    line: int
    column: int
    function: str  # the innermost def around the mutation (cosmic-ray's definition_name)
    operator: str  # cosmic-ray's operator name without "core/"
    occurrence: int  # cosmic-ray's index of this mutation among the operator's in the module
    before: str  # the source line, stripped
    after: str  # the mutated line, stripped
    outcome: str  # "killed", "survived", "timeout" or "incompetent" (the mutation could not be applied)


@dataclass
class Run:
    """A finished run: its mutants in source order, how many the OPERATORS make and cosmic-ray's
    operators make in all, and the unmutated conform's case count and time."""

    mutants: list[Mutant]
    of_operators: int
    total: int
    cases: int
    conform_seconds: float


def scratch_copy(rev: str | None, workdir: Path) -> Path:
    """`git archive rev` unpacked into workdir/tree (replaced if present); with rev None, a copy of the
    working tree's `adalora_ref/` and `golden/cases/`, all that conform needs (no git required)."""
    tree = workdir / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    if rev is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "adalora_ref", tree / "adalora_ref", ignore=ignore)
        shutil.copytree(ROOT / "golden" / "cases", tree / "golden" / "cases")
        return tree
    tree.mkdir(parents=True)
    archive = workdir / "tree.tar"
    with archive.open("wb") as out:
        done = subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=out, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise MutationError(f"git archive {rev}: {done.stderr.decode().strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    return tree


def cosmic_ray_config(modules: Iterable[str], timeout: float) -> str:
    paths = ", ".join(f'"adalora_ref/{m}.py"' for m in modules)
    return (
        "[cosmic-ray]\n"
        f"module-path = [{paths}]\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{TEST_COMMAND}"\n\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )


def _cosmic_ray(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("cosmic-ray") or str(Path(sys.executable).with_name("cosmic-ray"))
    if not Path(exe).exists():
        raise MutationError('cosmic-ray is not installed: pip install ".[mutation]"')
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)


def select(db: Path, tree: Path, *, sample: int | None = None, only: set[str] | None = None) -> tuple[int, int, int]:
    """Skip every work item whose operator is not in OPERATORS, then all but `sample` of the rest
    (a seeded choice over the items in source order), or all but the mutant ids in `only`.
    Returns (items to run, items of OPERATORS, items in all)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db), WorkDB.Mode.open) as work_db:
        items = list(work_db.pending_work_items)
        kept = sorted((i for i in items if i.mutations[0].operator_name in OPERATORS), key=_item_order)
        of_operators = len(kept)
        if only is not None:
            ids = mutant_ids(kept, tree)
            missing = sorted(only - set(ids.values()))
            if missing:
                raise MutationError(f"no mutant with id {', '.join(missing)} in this revision (its line changed?)")
            kept = [i for i in kept if ids[i.job_id] in only]
        elif sample is not None and sample < len(kept):
            kept = sorted(random.Random(SAMPLE_SEED).sample(kept, sample), key=_item_order)
        chosen = {i.job_id for i in kept}
        skipped = [i.job_id for i in items if i.job_id not in chosen]
        reason = "not in the run (operator not in mutation/session.py OPERATORS, or not selected)"
        work_db.set_multiple_results(skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=reason))
    return len(chosen), of_operators, len(items)


def mutant_ids(items: Iterable, tree: Path) -> dict[str, str]:
    """{cosmic-ray job id: stable mutant id} for work items, numbered in source order: a hash of the
    module, the function, the operator and the line's text, and the mutant's index among those
    that share all four (a number's n + 1 and n - 1, or two identical lines in one function)."""
    lines: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    ids = {}
    for item in sorted(items, key=_item_order):
        m = item.mutations[0]
        module = str(m.module_path)
        if module not in lines:
            lines[module] = (tree / module).read_text().splitlines()
        key = f"{module}|{m.definition_name}|{m.operator_name.removeprefix('core/')}|{_line(lines[module], m)}"
        seen[key] = seen.get(key, -1) + 1
        ids[item.job_id] = hashlib.sha1(f"{key}|{seen[key]}".encode()).hexdigest()[:10]
    return ids


def _line(lines: list[str], m) -> str:
    return lines[m.start_pos[0] - 1].strip()


def _item_order(item) -> tuple:
    return _order(item.mutations[0])


def _order(m) -> tuple:
    return (str(m.module_path), tuple(m.start_pos), m.operator_name, m.occurrence)


def run(
    modules: Iterable[str],
    *,
    rev: str | None = "HEAD",
    sample: int | None = None,
    only: set[str] | None = None,
    workdir: Path | None = None,
) -> Run:
    """Mutate `modules` (names from MODULES) of revision `rev` (None: the working tree), run conform
    on every selected mutant (all, a `sample`, or the mutant ids in `only`), and return them in
    source order. Progress goes to stderr."""
    modules = list(modules)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise MutationError(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    if workdir is None:  # a temporary scratch copy, removed afterwards
        with tempfile.TemporaryDirectory(prefix="adalora-mutation-") as tmp:
            return run(modules, rev=rev, sample=sample, only=only, workdir=Path(tmp))
    tree = scratch_copy(rev, workdir)
    started = time.monotonic()
    baseline = subprocess.run(TEST_COMMAND.split(), cwd=tree, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if baseline.returncode != 0:
        tail = (baseline.stdout + baseline.stderr)[-2000:]
        raise MutationError(f"the unmutated reference fails conform:\n{tail}")
    cases = int(baseline.stdout.strip().splitlines()[-1].split()[0])  # "79 passed, 0 failed"
    timeout = max(30.0, round(20 * seconds))
    (tree / "cosmic-ray.toml").write_text(cosmic_ray_config(modules, timeout))
    db = tree / "session.sqlite"
    done = _cosmic_ray(["init", "cosmic-ray.toml", str(db)], tree)
    if done.returncode != 0:
        raise MutationError(f"cosmic-ray init failed:\n{done.stderr[-2000:]}")
    selected, of_operators, total = select(db, tree, sample=sample, only=only)
    print(
        f"mutation: {selected} mutants to run ({of_operators} of OPERATORS, {total} in all); conform takes "
        f"{seconds:.1f} s unmutated (timeout {timeout:.0f} s); scratch copy {tree}",
        file=sys.stderr,
    )
    _exec_with_progress(db, tree, selected)
    return Run(read_mutants(db, tree), of_operators, total, cases, round(seconds, 2))


def _exec_with_progress(db: Path, tree: Path, selected: int) -> None:
    finished = threading.Event()

    def report() -> None:
        while not finished.wait(60):
            print(f"mutation: {_done(db) - _skipped_count(db)} of {selected} mutants run", file=sys.stderr)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        done = _cosmic_ray(["exec", "cosmic-ray.toml", str(db)], tree)
    finally:
        finished.set()
    if done.returncode != 0:
        raise MutationError(f"cosmic-ray exec failed:\n{done.stderr[-2000:]}")


def _done(db: Path) -> int:
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(db), WorkDB.Mode.open) as work_db:
        return work_db.num_results


def _skipped_count(db: Path) -> int:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome

    with use_db(str(db), WorkDB.Mode.open) as work_db:
        return sum(r.worker_outcome == WorkerOutcome.SKIPPED for _, r in work_db.results)


def read_mutants(db: Path, tree: Path) -> list[Mutant]:
    """The run's mutants (skipped ones left out), in source order, each with a stable id."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    mutants = []
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        ids = mutant_ids((i for i in work_db.work_items if i.mutations[0].operator_name in OPERATORS), tree)
        for item, result in sorted(work_db.completed_work_items, key=lambda pair: _item_order(pair[0])):
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            m = item.mutations[0]
            line, column = m.start_pos
            before = _line((tree / m.module_path).read_text().splitlines(), m)
            if result.worker_outcome != WorkerOutcome.NORMAL:
                outcome = "incompetent"
            elif result.output == "timeout":
                outcome = "timeout"
            else:
                outcome = "survived" if result.test_outcome == TestOutcome.SURVIVED else "killed"
            mutants.append(
                Mutant(
                    ids[item.job_id],
                    str(m.module_path),
                    line,
                    column,
                    m.definition_name or "<module>",
                    m.operator_name.removeprefix("core/"),
                    m.occurrence,
                    before,
                    _mutated_line(result.diff, before),
                    outcome,
                )
            )
    return mutants


def _mutated_line(diff: str | None, before: str) -> str:
    """The `+` line of cosmic-ray's unified diff (the line as mutated), stripped."""
    lines = (diff or "").splitlines()
    added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else before
