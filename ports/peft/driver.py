"""Run a peft release's AdaLoRA as a port: read each golden case's config and inputs, drive the
installed peft on them, write its outputs in the port format (docs/SPEC.md 15, driver rules 16.2).

    python ports/peft/driver.py --out OUT                  every case, one process each (2 at a time)
    python ports/peft/driver.py --cases DIR --out OUT      the cases of DIR (default golden/cases)
    python ports/peft/driver.py --out OUT --case ID        one case, in this process

Run it with the python of a virtual environment that holds torch, some peft release (0.4.0 ..
0.21.2), transformers, and this project (`pip install --no-deps -e .`): ports/build.py makes such
environments. A whole run writes OUT afresh: OUT/port.json declares the cases the release cannot
express (an API it lacks, with the reason), each other case runs in its own process (a crash or an
exception costs that case only, and OUT/driver_log.json records its last error line), and every file
is written atomically. Then `adalora-ref conform --port OUT` judges the release.

The release is driven through its own API only; the differences between releases are mapped in
compat.py and listed in ports/README.md. What a release computes differently shows in its outputs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "golden")]  # compat, layers, training; golden/gen

from adalora_ref._files import write_atomically  # noqa: E402
from adalora_ref.conformance.case import Case, case_ids, read_case, read_manifest  # noqa: E402
from adalora_ref.conformance.port import PORT_JSON, write_port_outputs  # noqa: E402

LOG = "driver_log.json"
FORK = multiprocessing.get_context("fork")
DEFAULT_CASES = REPO / "golden" / "cases"


def run_case(case: Case) -> dict:
    """The release's outputs for `case`, computed with torch's default dtype set to the case's: the
    tensors a release creates itself (adapter weights before 0.7, loaded checkpoints) then have the
    dtype the case runs in, as the base layers do."""
    import layers
    import torch
    import training

    runners = {
        "layer": layers.run_layer,
        "conv_layer": layers.run_layer,
        "init": layers.run_init,
        "orth": layers.run_orth,
        "schedule": layers.run_schedule,
        "allocator": training.run_allocator,
        "trajectory": training.run_trajectory,
        "checkpoint": training.run_checkpoint,
        "config": layers.run_config,
        "targeting": layers.run_targeting,
    }
    if case.kind not in runners:
        raise ValueError(f"{case.id}: kind {case.kind!r} has no runner in this driver")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if case.dtype == "float64" else torch.float32)
    try:
        return runners[case.kind](case)
    finally:
        torch.set_default_dtype(previous)


def drive_one(cases: Path, out: Path, case_id: str) -> None:
    """Run one case in this process and write its outputs under `out`."""
    import warnings

    case = read_case(cases, case_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = run_case(case)
    write_port_outputs(out, case, outputs)


def declared_unsupported(cases: Path, ids: list[str]) -> dict[str, str]:
    """{case id: reason} for the cases the installed release cannot express."""
    import compat

    declared = {}
    for case_id in ids:
        reason = compat.unsupported_reason(read_case(cases, case_id))
        if reason is not None:
            declared[case_id] = reason
    return declared


def fresh_output(out: Path) -> None:
    """Make `out` an empty folder: a new one, an empty one, or one an earlier run of this driver wrote
    (it holds driver_log.json); anything else is refused rather than deleted."""
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"driver: --out {out}: exists and is not a directory")
        if any(out.iterdir()):
            if not (out / LOG).is_file():
                raise SystemExit(f"driver: --out {out}: not empty and not written by this driver ({LOG} missing)")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def child(cases: Path, out: Path, case_id: str, timeout: float) -> tuple[str, str | None, float]:
    """Run one case in its own process: (id, None or the reason it produced no outputs, seconds)."""
    start = time.perf_counter()
    command = [sys.executable, str(Path(__file__).resolve()), "--cases", str(cases), "--out", str(out)]
    try:
        done = subprocess.run(
            [*command, "--case", case_id], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return case_id, f"timed out after {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if done.returncode == 0:
        return case_id, None, seconds
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return case_id, f"exit {done.returncode}: {lines[-1] if lines else 'no message'}", seconds


def error_line(err: BaseException) -> str:
    """`Type: message` on one line (a message's lines joined, cut to 300 characters)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def _forked_case(cases: Path, out: Path, case_id: str, report: Any) -> None:
    """The body of a forked case process: run the case, send None or its error line, exit 0 or 1."""
    try:
        drive_one(cases, out, case_id)
    except BaseException as err:
        report.send(error_line(err))
        sys.stderr.flush()
        os._exit(1)
    report.send(None)
    os._exit(0)


def forked(cases: Path, out: Path, todo: list[str], jobs: int, timeout: float) -> list[tuple[str, str | None, float]]:
    """Run each case in a process forked from this one (torch and peft already imported, so a case
    costs no interpreter start), `jobs` at a time, all forked from this one thread: a crash, an
    exception or a timeout costs that case only. (id, None or why it wrote nothing, seconds) each."""
    pending, running, done = list(todo), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            case_id = pending.pop(0)
            receive, send = FORK.Pipe(duplex=False)
            process = FORK.Process(target=_forked_case, args=(cases, out, case_id, send))
            process.start()
            send.close()
            running[process.sentinel] = (case_id, process, receive, time.perf_counter())
        ready = set(wait(list(running), timeout=1.0))
        for sentinel, (case_id, process, receive, start) in list(running.items()):
            seconds = time.perf_counter() - start
            if sentinel in ready:
                process.join()
                try:
                    message = receive.recv() if receive.poll() else None
                except EOFError:  # killed before it could say why: the pipe is closed, not written
                    message = None
                why = None if process.exitcode == 0 else f"exit {process.exitcode}: {message or 'the process died'}"
            elif seconds > timeout:
                process.kill()
                process.join()
                why = f"timed out after {timeout:.0f} s"
            else:
                continue
            receive.close()
            done[case_id] = (case_id, why, seconds)
            del running[sentinel]
    return [done[case_id] for case_id in todo]


def in_process(cases: Path, out: Path, case_id: str) -> tuple[str, str | None, float]:
    """Run one case in this process: an exception costs this case only (a crash would cost the run)."""
    start = time.perf_counter()
    try:
        drive_one(cases, out, case_id)
    except Exception as err:
        return case_id, error_line(err), time.perf_counter() - start
    return case_id, None, time.perf_counter() - start


ISOLATION = ("fork", "spawn", "none")


def drive_all(cases: Path, out: Path, selected: list[str] | None, jobs: int, timeout: float, isolation: str) -> int:
    """Every case (or those `selected`), each in its own process (`isolation` fork or spawn), `jobs`
    at a time, or all in this one (`none`); then port.json and the log."""
    import layers  # noqa: F401  (torch and peft imported once, before any fork)
    import peft
    import torch
    import training  # noqa: F401

    read_manifest(cases)
    ids = case_ids(cases)
    fresh_output(out)
    declared = declared_unsupported(cases, ids)
    write_atomically(out / PORT_JSON, (json.dumps({"unsupported": declared}, indent=1) + "\n").encode())
    todo = [i for i in (selected or ids) if i not in declared]
    start = time.perf_counter()
    if isolation == "fork":
        results = forked(cases, out, todo, jobs, timeout)
    elif isolation == "spawn":
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda i: child(cases, out, i, timeout), todo))
    else:
        results = [in_process(cases, out, i) for i in todo]
    failed = {case_id: why for case_id, why, _ in results if why is not None}
    for case_id, why in failed.items():
        print(f"driver: {case_id}: no outputs ({why})", file=sys.stderr)
    log = {
        "peft": peft.__version__,
        "torch": torch.__version__,
        "cases_dir": str(cases),
        "ran": len(todo),
        "unsupported": len(declared),
        "failed": failed,
        "seconds": {case_id: round(s, 2) for case_id, _, s in results},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_atomically(out / LOG, (json.dumps(log, indent=1) + "\n").encode())
    print(
        f"driver: peft {peft.__version__}: {len(todo)} cases run ({len(failed)} without outputs), "
        f"{len(declared)} declared unsupported, {log['wall_seconds']} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, metavar="DIR", help="cases (default golden/cases)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="where the port outputs go")
    parser.add_argument("--case", metavar="ID", help="run only this case, in this process (no port.json, no log)")
    parser.add_argument("--only", action="append", metavar="ID", help="with a whole run: only these cases")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one case may take (default 600)")
    parser.add_argument(
        "--isolation",
        choices=ISOLATION,
        default="fork",
        help="each case in a process forked from this one (default), in a fresh interpreter (spawn), "
        "or all in this process (none: a crash ends the run)",
    )
    args = parser.parse_args(argv)
    if args.case is not None:
        drive_one(args.cases, args.out, args.case)
        return 0
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return drive_all(args.cases, args.out, args.only, max(1, args.jobs), args.timeout, args.isolation)


if __name__ == "__main__":
    sys.exit(main())
