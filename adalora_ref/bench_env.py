"""What the benchmark ran on: each side's BLAS library, kernel and threads, and the variables that pin them.

The timings of `adalora-ref bench` depend on more than the two implementations: NumPy's BLAS
(OpenBLAS, MKL, ...) picks a kernel for the CPU at load time, torch carries its own MKL and
OpenMP, CuPy calls cuBLAS, and environment variables can override each of them. This module
reports what was actually loaded in the process, so that a figure says what it measured:

    NumPy    every BLAS library threadpoolctl finds in NumPy's own folders (wheels bundle one):
             library, version, threading layer, threads and kernel (OpenBLAS's "architecture",
             its corename: Haswell, SkylakeX, ...)
    torch    what torch reports of its build (`torch.__config__.show()`: BLAS_INFO, the MKL and
             oneDNN versions), its parallel backend and threads, the CPU capability ATen's
             kernels dispatch to, its CUDA and cuDNN when a GPU is used, and any BLAS or OpenMP
             library threadpoolctl finds in torch's folder
    CuPy     the cuBLAS and CUDA runtime versions and the GPU, when CuPy is loaded

Each side is described only when its library is loaded (`sys.modules`): the bench imports what
it runs. What cannot be found out (threadpoolctl missing, a torch build without some report) is
"unknown" with the reason, never an error. `pinned_variables` lists the environment variables
set here that pin a kernel or a thread count (PINS), each with the side it affects and what it
may change; bench_report.py prints them in the header, puts them in the JSON and on stderr.

This module reads the process and its environment; it changes nothing in either.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Pin:
    """An environment variable that pins a kernel or a thread count, and what setting it does."""

    variable: str
    affects: str  # the side and library it acts on
    effect: str  # what setting it may change in the figures


PINS = (
    Pin(
        "OPENBLAS_CORETYPE",
        "NumPy (OpenBLAS)",
        "OpenBLAS runs the kernel named instead of the one it detects for this CPU: matrix products "
        "(the layer benchmarks) may run well below this CPU's speed; unset it (with OPENBLAS_L2_SIZE) "
        "to measure the CPU's own kernel",
    ),
    Pin(
        "OPENBLAS_L2_SIZE",
        "NumPy (OpenBLAS)",
        "OpenBLAS sizes its blocks for this L2 cache size instead of the detected one",
    ),
    Pin(
        "OPENBLAS_NUM_THREADS",
        "NumPy (OpenBLAS), and torch through the bench",
        "fixes the threads of NumPy's OpenBLAS; the bench gives torch the same count",
    ),
    Pin(
        "OMP_NUM_THREADS",
        "torch (OpenMP) and NumPy (OpenBLAS reads it when OPENBLAS_NUM_THREADS is unset)",
        "fixes the threads of torch's OpenMP pool and of NumPy's BLAS",
    ),
    Pin(
        "MKL_NUM_THREADS",
        "torch (MKL), and NumPy where it is built on MKL",
        "fixes the threads of MKL",
    ),
    Pin(
        "MKL_DEBUG_CPU_TYPE",
        "torch (MKL), and NumPy where it is built on MKL",
        "MKL before 2020.1 runs the code path of that CPU type instead of this CPU's (later MKL ignores it)",
    ),
    Pin(
        "MKL_ENABLE_INSTRUCTIONS",
        "torch (MKL), and NumPy where it is built on MKL",
        "caps the instruction set of MKL's kernels (e.g. AVX2 on an AVX-512 CPU)",
    ),
    Pin(
        "MKL_CBWR",
        "torch (MKL), and NumPy where it is built on MKL",
        "MKL keeps to one code path for reproducible results, which may be slower than this CPU's own",
    ),
    Pin(
        "ATEN_CPU_CAPABILITY",
        "torch (ATen)",
        "caps the instruction set of ATen's vectorised kernels (default, avx2, avx512)",
    ),
    Pin(
        "ONEDNN_MAX_CPU_ISA",
        "torch (oneDNN)",
        "caps the instruction set of oneDNN's kernels",
    ),
    Pin(
        "DNNL_MAX_CPU_ISA",
        "torch (oneDNN)",
        "caps the instruction set of oneDNN's kernels (the variable's older name)",
    ),
)
"""The variables `pinned_variables` looks for, in the order it reports them."""


@dataclass(frozen=True)
class PinnedVariable:
    """A variable of PINS set (to a non-empty value) in the environment."""

    pin: Pin
    value: str

    @property
    def text(self) -> str:
        return f"{self.pin.variable}={self.value} is set, for {self.pin.affects}: {self.pin.effect}"

    def as_dict(self) -> dict[str, str]:
        return {
            "variable": self.pin.variable,
            "value": self.value,
            "affects": self.pin.affects,
            "effect": self.pin.effect,
        }


def pinned_variables(environ: Mapping[str, str] | None = None) -> list[PinnedVariable]:
    """The variables of PINS set in `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    return [PinnedVariable(pin, environ[pin.variable]) for pin in PINS if environ.get(pin.variable, "").strip()]


# -- what each side loaded --------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    """One library as threadpoolctl finds it loaded: a BLAS, or an OpenMP runtime."""

    user_api: str  # "blas" or "openmp"
    internal_api: str  # openblas, mkl, blis, openmp, ...
    version: str | None
    threading_layer: str | None  # pthreads, openmp, ...: how a BLAS runs its threads
    num_threads: int | None
    architecture: str | None  # the kernel OpenBLAS or BLIS runs (OpenBLAS's corename)
    filepath: str

    @property
    def text(self) -> str:
        threads = None if self.num_threads is None else f"{self.num_threads} threads"
        details = [d for d in (self.threading_layer, threads) if d is not None]
        if self.architecture is not None:
            details.append(f"kernel {self.architecture}")
        version = "" if self.version is None else f" {self.version}"
        return f"{self.internal_api}{version}" + (f" ({', '.join(details)})" if details else "")


def loaded_libraries() -> list[Library] | str:
    """Every BLAS and OpenMP library loaded in this process (threadpoolctl), or why it cannot be known."""
    try:
        import threadpoolctl
    except ImportError as err:
        return f"threadpoolctl is not installed ({err}); pip install threadpoolctl"
    return [
        Library(
            user_api=str(info.get("user_api")),
            internal_api=str(info.get("internal_api")),
            version=info.get("version"),
            threading_layer=info.get("threading_layer"),
            num_threads=info.get("num_threads"),
            architecture=info.get("architecture"),
            filepath=str(info.get("filepath")),
        )
        for info in threadpoolctl.threadpool_info()
    ]


def _package_folders(module: Any) -> list[Path]:
    """The folders a package's libraries live in: its own, and the `<name>.libs` beside it (wheels)."""
    folder = Path(os.path.realpath(module.__file__)).parent
    return [folder, folder.with_name(folder.name + ".libs")]


def _inside(filepath: str, folders: list[Path]) -> bool:
    path = Path(os.path.realpath(filepath))
    return any(path.is_relative_to(folder) for folder in folders)


def numpy_blas(libraries: list[Library] | str) -> dict[str, Any]:
    """NumPy's BLAS: the BLAS libraries of `libraries` in NumPy's folders, or, where NumPy links a
    BLAS outside them (a distribution's NumPy), every BLAS loaded; `unknown` says why it is not known."""
    if isinstance(libraries, str):
        return {"libraries": [], "unknown": libraries}
    blas = [lib for lib in libraries if lib.user_api == "blas"]
    if not blas:
        return {"libraries": [], "unknown": "threadpoolctl finds no BLAS library loaded"}
    own = [lib for lib in blas if _inside(lib.filepath, _package_folders(np))]
    return {"libraries": own or blas, "unknown": None}


def numpy_blas_threads() -> int | None:
    """The threads NumPy's BLAS runs on, as the loaded library reports them; None when unknown."""
    threads = [lib.num_threads for lib in numpy_blas(loaded_libraries())["libraries"] if lib.num_threads]
    return max(threads) if threads else None


def _probe(read: Callable[[], Any]) -> Any | None:
    """What `read` returns, or None where this build of a library cannot tell (an attribute or a
    report missing, or the library refusing: a CUDA call without a GPU)."""
    try:
        return read()
    except (AttributeError, ImportError, OSError, RuntimeError, TypeError, ValueError):
        return None


def _search(pattern: str, text: str | None) -> str | None:
    match = None if text is None else re.search(pattern, text)
    return None if match is None else match.group(1).strip()


def torch_blas(torch: Any, libraries: list[Library] | str) -> dict[str, Any]:
    """What torch reports of its BLAS, kernels and threads (None for what this build does not report)."""
    config = _probe(lambda: str(torch.__config__.show()))
    parallel = _probe(lambda: str(torch.__config__.parallel_info()))
    cuda = _probe(lambda: bool(torch.cuda.is_available()))
    folders = _probe(lambda: _package_folders(torch)) or []
    own = [] if isinstance(libraries, str) else [lib for lib in libraries if _inside(lib.filepath, folders)]
    return {
        "version": _probe(lambda: str(torch.__version__)),
        "blas": _search(r"BLAS_INFO=(\w+)", config),
        "mkl_version": _search(r"Math Kernel Library Version ([\d.]+)", config),
        "parallel_backend": _search(r"ATen parallel backend: (.+)", parallel),
        "num_threads": _probe(lambda: int(torch.get_num_threads())),
        "cpu_capability": _probe(lambda: str(torch.backends.cpu.get_cpu_capability())),
        "mkldnn_version": _search(r"MKL-DNN (v[\d.]+)", config),
        "mkldnn_enabled": _probe(lambda: bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)),
        "libraries": own,  # the BLAS and OpenMP libraries threadpoolctl finds in torch's folder
        "cuda": _probe(lambda: torch.version.cuda),
        "cudnn": _probe(lambda: torch.backends.cudnn.version()) if cuda else None,
        "gpu": _probe(lambda: str(torch.cuda.get_device_name())) if cuda else None,
    }


def cupy_blas(cupy: Any) -> dict[str, Any]:
    """CuPy's cuBLAS and CUDA runtime versions (cuBLAS's own integer, e.g. 120402) and the GPU."""
    return {
        "version": _probe(lambda: str(cupy.__version__)),
        "cublas": _probe(lambda: int(cupy.cuda.cublas.getVersion(cupy.cuda.device.get_cublas_handle()))),
        "cuda_runtime": _probe(lambda: int(cupy.cuda.runtime.runtimeGetVersion())),
        "gpu": _probe(lambda: cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()),
    }


# -- the description --------------------------------------------------------------------------


@dataclass(frozen=True)
class BlasEnvironment:
    """What each side loaded (None for a side whose library is not loaded) and the pinned variables."""

    numpy: dict[str, Any]
    torch: dict[str, Any] | None
    cupy: dict[str, Any] | None
    pins: list[PinnedVariable]

    @property
    def text(self) -> str:
        """One line for the sides ("BLAS: NumPy ...; torch ..."), then one "Warning:" line per pinned variable."""
        parts = [f"NumPy {_numpy_text(self.numpy)}"]
        if self.torch is not None:
            parts.append(f"torch {_torch_text(self.torch)}")
        if self.cupy is not None:
            c = self.cupy
            parts.append(
                f"CuPy cuBLAS {_or_unknown(c['cublas'])}, CUDA runtime {_or_unknown(c['cuda_runtime'])}"
                f" on {_or_unknown(c['gpu'])}"
            )
        lines = ["BLAS: " + "; ".join(parts)]
        return "\n".join(lines + [f"Warning: {p.text}." for p in self.pins])

    def as_dict(self) -> dict[str, Any]:
        """The sides as plain data (libraries as dicts, None for unknown); the pins are `warnings`."""

        def plain(side: dict[str, Any] | None) -> dict[str, Any] | None:
            if side is None:
                return None
            return {k: [dataclasses.asdict(lib) for lib in v] if k == "libraries" else v for k, v in side.items()}

        return {"numpy": plain(self.numpy), "torch": plain(self.torch), "cupy": plain(self.cupy)}

    @property
    def warnings(self) -> list[dict[str, str]]:
        return [p.as_dict() for p in self.pins]


def _or_unknown(value: Any) -> str:
    return UNKNOWN if value is None else str(value)


def _numpy_text(side: dict[str, Any]) -> str:
    if side["unknown"] is not None:
        return f"BLAS {UNKNOWN} ({side['unknown']})"
    return ", ".join(lib.text for lib in side["libraries"])


def _torch_text(side: dict[str, Any]) -> str:
    blas = _or_unknown(side["blas"])
    if side["mkl_version"] is not None:
        blas += f" {side['mkl_version']}"
    details = [
        f"{_or_unknown(side['parallel_backend'])}",
        f"{_or_unknown(side['num_threads'])} threads",
        f"CPU capability {_or_unknown(side['cpu_capability'])}",
        f"oneDNN {_or_unknown(side['mkldnn_version'])}" + (" (off)" if side["mkldnn_enabled"] is False else ""),
    ]
    details += [lib.text for lib in side["libraries"] if lib.user_api == "blas"]
    if side["gpu"] is not None:
        details.append(f"CUDA {_or_unknown(side['cuda'])}, cuDNN {_or_unknown(side['cudnn'])} on {side['gpu']}")
    return f"{blas} ({', '.join(details)})"


def describe(environ: Mapping[str, str] | None = None) -> BlasEnvironment:
    """Each loaded side's BLAS as this process runs it now, and the pinned variables of `environ`
    (default: this process's environment). Never raises for a library missing or reporting less."""
    libraries = loaded_libraries()
    torch, cupy = sys.modules.get("torch"), sys.modules.get("cupy")
    return BlasEnvironment(
        numpy=numpy_blas(libraries),
        torch=None if torch is None else torch_blas(torch, libraries),
        cupy=None if cupy is None else cupy_blas(cupy),
        pins=pinned_variables(environ),
    )


def cpu_instruction_set(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The widest vector instruction set the CPU reports (AVX-512, AVX2, AVX), None where unknown:
    beside the kernel NumPy runs, it shows a kernel older than the CPU."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return None
