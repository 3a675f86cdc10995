"""Build the compliance matrix: every listed peft release (and the authors' loralib) run as a port on
the golden cases, judged by `adalora-ref conform`, written to docs/PORTS.md.

    python ports/build.py --loralib /work/ext/AdaLoRA       every release of RELEASES, loralib, the reference
    python ports/build.py --release 0.9.0 --release 0.21.2  only these releases (then loralib if given)
    python ports/build.py --matrix-only                     rewrite docs/PORTS.md from the last reports

For each release it makes (once) a virtual environment under the cache directory (default
~/.cache/adalora-ref/ports, `--cache DIR`): `peft-<version>/`, with exactly `torch==2.13.0`, the pins
of RELEASES (numpy, transformers, accelerate) and `peft==<version>`, and this project installed with
`pip install --no-deps -e`. It then runs ports/peft/driver.py with that environment's python over all
cases into `out/peft-<version>/` and `adalora-ref conform --port ... --json` (this interpreter) into
`reports/peft-<version>.json`. Without `--loralib PATH` the loralib row is skipped with a note. The
reference row is `adalora-ref conform --json` itself. Nothing here is part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from matrix import Row, site_packages, write_matrix  # noqa: E402

# release -> the pins installed beside it (ports/README.md says why each): a transformers and an
# accelerate of the release's own months, numpy 1.26 where those predate numpy 2
RELEASES: dict[str, dict[str, str]] = {
    "0.4.0": {"numpy": "1.26.4", "transformers": "4.31.0", "accelerate": "0.21.0"},
    "0.5.0": {"numpy": "1.26.4", "transformers": "4.32.1", "accelerate": "0.22.0"},
    "0.6.2": {"numpy": "1.26.4", "transformers": "4.35.2", "accelerate": "0.24.1"},
    "0.9.0": {"numpy": "1.26.4", "transformers": "4.38.2", "accelerate": "0.27.2"},
    "0.12.0": {"numpy": "1.26.4", "transformers": "4.43.4", "accelerate": "0.33.0"},
    "0.15.2": {"numpy": "2.2.6", "transformers": "4.51.3", "accelerate": "1.6.0"},
    "0.18.1": {"numpy": "2.2.6", "transformers": "4.57.6", "accelerate": "1.12.0"},
    "0.21.2": {"numpy": "2.4.6", "transformers": "5.24.0", "accelerate": "1.15.0"},  # the control
}
DEFAULT_CACHE = Path.home() / ".cache" / "adalora-ref" / "ports"
TORCH = "torch==2.13.0"  # exactly this: pip takes the CPU wheel on disk
PROJECT_DEPS = ["safetensors", "array-api-compat", "tqdm"]  # what adalora_ref needs besides numpy


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command, check=False, **kwargs)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(cache: Path, version: str) -> Path:
    """The release's environment, made if missing (a `pins.json` marks one that installed whole)."""
    venv = cache / f"peft-{version}"
    pins = {"torch": "2.13.0", **RELEASES[version], "peft": version}
    marker = venv / "pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == pins:
        return venv
    if not venv_python(venv).exists() and run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
        raise RuntimeError(f"python -m venv {venv} failed")
    python = str(venv_python(venv))
    packages = [TORCH, *(f"{k}=={v}" for k, v in RELEASES[version].items()), *PROJECT_DEPS, f"peft=={version}"]
    if run([python, "-m", "pip", "install", "--quiet", *packages]).returncode != 0:
        raise RuntimeError(f"peft {version}: pip install {' '.join(packages)} failed")
    if run([python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(REPO)]).returncode != 0:
        raise RuntimeError(f"peft {version}: pip install --no-deps -e {REPO} failed")
    marker.write_text(json.dumps(pins, indent=1) + "\n")
    return venv


def conform(cases: Path, port: Path | None, report: Path) -> None:
    """`adalora-ref conform` (this interpreter) on a port's outputs, or on the reference; exit 1 (some
    case fails) is a result, anything else an error."""
    command = [sys.executable, "-m", "adalora_ref.cli", "conform", "--cases", str(cases), "--json", str(report)]
    if port is not None:
        command[4:4] = ["--port", str(port)]
    done = run(command, stdout=subprocess.DEVNULL)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}")


def build_release(cache: Path, cases: Path, version: str, jobs: int) -> None:
    venv = ensure_venv(cache, version)
    out = cache / "out" / f"peft-{version}"
    driver = [str(venv_python(venv)), str(HERE / "peft" / "driver.py"), "--cases", str(cases), "--out", str(out)]
    if run([*driver, "--jobs", str(jobs)]).returncode != 0:
        raise RuntimeError(f"peft {version}: the driver failed as a whole")
    conform(cases, out, cache / "reports" / f"peft-{version}.json")


def build_loralib(cache: Path, cases: Path, loralib: Path) -> None:
    """The authors' loralib, through ports/loralib/driver.py (this interpreter, which has torch)."""
    out = cache / "out" / "loralib"
    command = [sys.executable, str(HERE / "loralib" / "driver.py"), "--loralib", str(loralib)]
    if run([*command, "--cases", str(cases), "--out", str(out)]).returncode != 0:
        raise RuntimeError("loralib: ports/loralib/driver.py failed as a whole")
    conform(cases, out, cache / "reports" / "loralib.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", action="append", choices=sorted(RELEASES), help="only this release (repeatable)")
    parser.add_argument("--loralib", type=Path, help="a checkout of github.com/QingruZhang/AdaLoRA (its loralib row)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the environments and outputs go")
    parser.add_argument(
        "--cases", type=Path, default=REPO / "golden" / "cases", help="the cases (default golden/cases)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once by each driver (default 2)")
    parser.add_argument("--matrix", type=Path, default=REPO / "docs" / "PORTS.md", help="the matrix file")
    parser.add_argument("--matrix-only", action="store_true", help="only rewrite the matrix from the last reports")
    args = parser.parse_args(argv)
    cache, cases = args.cache.expanduser().resolve(), args.cases.resolve()
    (cache / "reports").mkdir(parents=True, exist_ok=True)
    versions = args.release or list(RELEASES)
    failures = []
    if not args.matrix_only:
        for version in versions:
            try:
                build_release(cache, cases, version, args.jobs)
            except RuntimeError as err:  # an environment that cannot be built is a row with the reason
                failures.append(str(err))
                (cache / "reports" / f"peft-{version}.error").write_text(str(err) + "\n")
        if args.loralib is not None:
            try:
                build_loralib(cache, cases, args.loralib.resolve())
            except RuntimeError as err:
                failures.append(str(err))
        conform(cases, None, cache / "reports" / "reference.json")
    reports, outs = cache / "reports", cache / "out"
    rows = [
        Row(f"peft {v}", reports / f"peft-{v}.json", site_packages(cache / f"peft-{v}"), outs / f"peft-{v}")
        for v in RELEASES
    ]
    loralib = args.loralib.resolve() if args.loralib is not None else None
    rows.append(Row("loralib (authors)", reports / "loralib.json", loralib, outs / "loralib"))
    rows.append(Row("adalora-ref (reference)", cache / "reports" / "reference.json", None))
    command = "python ports/build.py" + ("" if args.loralib is None else f" --loralib {args.loralib}")
    if args.cache != DEFAULT_CACHE:
        command += f" --cache {args.cache}"
    command += "".join(f" --release {v}" for v in args.release or [])
    write_matrix(args.matrix, rows, command, loralib_given=args.loralib is not None or args.matrix_only)
    for failure in failures:
        print(f"build: {failure}", file=sys.stderr)
    print(f"build: wrote {args.matrix}")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
