"""Drive the authors' loralib (QingruZhang/AdaLoRA) on the golden cases and write port outputs.

    python ports/loralib/driver.py --loralib /path/to/AdaLoRA --cases golden/cases --out OUT [--case ID_OR_GLOB]...

`--loralib` is a checkout of github.com/QingruZhang/AdaLoRA (it holds loralib/loralib/adalora.py);
its code is imported from there, never copied. Every selected case runs in a process of its own
(docs/SPEC.md 16.2): one that raises or dies costs that case alone, which is then left without
outputs and reported on stderr. Before a case runs, its outputs from an earlier run are removed,
so that a case that fails this time is never judged on old files; every file is written through a
temporary file and a rename. OUT/port.json declares the cases loralib cannot express, with the
reason; those are not run. Then judge with `adalora-ref conform --cases CASES --port OUT`.

Exit status: 0 once every selected case has been run or declared unsupported (a case that raised
counts: the outputs it lacks show in conform), 2 for a bad command line, an --loralib that is not
such a checkout, or a cases folder that does not verify.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import traceback
from pathlib import Path

from adalora_ref._files import write_atomically
from adalora_ref.conformance.case import CaseError, case_ids, read_case, read_manifest
from adalora_ref.conformance.port import PORT_JSON, unsupported_reason, write_port_outputs

PROG = "ports/loralib/driver.py"
ADALORA_PY = Path("loralib") / "loralib" / "adalora.py"
TIMEOUT_S = 600

NO_TRIPLET_AT_R0 = (
    "loralib's SVDLinear with r = 0 is a plain nn.Linear: lora_A, lora_E, lora_B, scaling and ranknum "
    "are created only under `if r > 0:` (adalora.py:33-47), so a zero-size triplet has no counterpart"
)
NO_SVD_CONV = (
    "loralib's AdaLoRA adapts only linear layers: adalora.py has SVDLinear and no SVD Conv2d "
    "(layers.py's Conv2d is plain LoRA, B @ A with scaling lora_alpha / r)"
)
UNSUPPORTED = {
    "layer/r_zero_*": NO_TRIPLET_AT_R0,
    "init/r_zero": NO_TRIPLET_AT_R0,
    "layer/disable_and_safe_merge_*": (
        "SVDLinear has no disable_adapters and no safe merge: it merges only in eval() and unmerges in train(), "
        "unchecked (adalora.py:64-86)"
    ),
    "layer/safe_merge_refused_*": (
        "SVDLinear has no safe merge to refuse: eval() adds B @ (A * E) to the weight unchecked (adalora.py:76-86)"
    ),
    "conv_layer/*": NO_SVD_CONV,
    "trajectory/cnn_*": NO_SVD_CONV,
    "init/init_lora_weights_false*": (
        "loralib has no init_lora_weights option: reset_parameters always sets E = 0 and draws A, B from "
        "N(0, 0.02) (adalora.py:55-62)"
    ),
    "trajectory/two_adapters_64": (
        "an SVDLinear holds one triplet: loralib has no named adapters, no second adapter in inference mode"
    ),
    "checkpoint/*": (
        "peft's checkpoint format: loralib saves lora_state_dict (utils.py:33) and has no adapter_config.json, "
        "no rank_pattern in a config and no resize by rank pattern on load"
    ),
    "config/*": "peft's AdaLoraConfig and its validation: loralib has no config object (RankAllocator takes arguments)",
    "targeting/*": (
        "peft's target matching (target_modules, layers_to_transform, ...): with loralib one replaces the "
        "nn.Linear modules by SVDLinear in the model's code"
    ),
}


class DriverError(Exception):
    """A reason the driver cannot start, printed as one line."""


def loralib_checkout(path: Path) -> Path:
    """The folder to put on sys.path (`<checkout>/loralib`), once `path` is shown to be a checkout."""
    if not (path / ADALORA_PY).is_file():
        raise DriverError(f"--loralib {path}: not a checkout of QingruZhang/AdaLoRA (no {ADALORA_PY} under it)")
    return path / "loralib"


def import_loralib(path: Path) -> None:
    """Import the checkout's loralib (and refuse any other loralib that Python might find first)."""
    package_dir = loralib_checkout(path)
    sys.path.insert(0, str(package_dir))
    import loralib

    found = Path(loralib.__file__).resolve().parent
    if found != (package_dir / "loralib").resolve():
        raise DriverError(f"--loralib {path}: `import loralib` found {found} instead of the checkout's")


def select(ids: list[str], globs: list[str] | None) -> list[str]:
    """The ids matching any of `globs` (all without), in case order; a glob matching none is an error."""
    if not globs:
        return ids
    for glob in globs:
        if not any(fnmatch.fnmatchcase(i, glob) for i in ids):
            raise DriverError(f"--case {glob!r} matches no case (ids look like {ids[0]!r})")
    return [i for i in ids if any(fnmatch.fnmatchcase(i, g) for g in globs)]


def run_one(args: argparse.Namespace) -> int:
    """The worker: run the case `args.worker` with loralib and write its outputs."""
    case_id = args.worker
    try:
        import_loralib(args.loralib)
        import kinds  # after import_loralib: kinds imports loralib

        case = read_case(args.cases, case_id)
        outputs = kinds.run_case(case, args.step_numbering)
        if case.dtype == "float64":  # the scalar-promotion trap of SPEC 16.2: nothing rounded to float32
            for key, value in outputs.items():
                if getattr(value, "dtype", None) is not None and value.dtype.kind == "f" and value.itemsize != 8:
                    raise TypeError(f"output {key!r} is {value.dtype} in a float64 case")
        write_port_outputs(args.out, case, outputs)
    except Exception as err:  # one line: what loralib (or the driver) raised, and where
        frame = traceback.extract_tb(err.__traceback__)[-1]
        print(f"{case_id}: {type(err).__name__}: {err} (at {frame.filename}:{frame.lineno})", file=sys.stderr)
        return 1
    return 0


def run_all(args: argparse.Namespace) -> int:
    """The driver: verify the cases, write port.json, run each selected case in its own process."""
    loralib_checkout(args.loralib)
    read_manifest(args.cases)
    ids = select(case_ids(args.cases), args.case)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"unsupported": UNSUPPORTED}, indent=1) + "\n"
    write_atomically(args.out / PORT_JSON, text.encode())
    failed, skipped = [], 0
    for case_id in ids:
        for suffix in (".json", ".safetensors"):
            (args.out / f"{case_id}{suffix}").unlink(missing_ok=True)
        if unsupported_reason(case_id, UNSUPPORTED) is not None:
            skipped += 1
            continue
        command = [sys.executable, __file__, "--loralib", str(args.loralib), "--cases", str(args.cases)]
        command += ["--out", str(args.out), "--step-numbering", args.step_numbering, "--worker", case_id]
        try:
            returncode = subprocess.run(command, timeout=args.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            print(f"{case_id}: killed after {args.timeout} s", file=sys.stderr)
            returncode = -1
        if returncode != 0:
            failed.append(case_id)
    ran = len(ids) - skipped
    print(f"loralib: {ran - len(failed)} of {ran} cases written to {args.out}, {skipped} declared unsupported", end="")
    print(f", {len(failed)} without outputs: {', '.join(failed)}" if failed else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--loralib", type=Path, required=True, help="a checkout of QingruZhang/AdaLoRA")
    parser.add_argument("--cases", type=Path, required=True, help="a folder of golden cases with its MANIFEST.json")
    parser.add_argument("--out", type=Path, required=True, help="the port output folder (created if missing)")
    parser.add_argument("--case", action="append", metavar="ID_OR_GLOB", help="only these cases (repeatable)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds one case may run (600)")
    parser.add_argument(
        "--step-numbering",
        choices=("loralib", "peft"),
        default="loralib",
        help="the global_step given to update_and_mask: loralib's trainers count from 0 (default, the faithful "
        "mapping); 'peft' passes the case's step number, a diagnostic that isolates the other differences",
    )
    parser.add_argument("--worker", metavar="ID", help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    try:
        return run_one(args) if args.worker else run_all(args)
    except (DriverError, CaseError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
