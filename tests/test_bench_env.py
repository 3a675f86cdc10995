"""bench_env: what the benchmark says it ran on, and its warnings about pinned kernels and threads.

What is checked: the pinned variables with and without them in the environment (and an empty one
is no pin); NumPy's BLAS as the loaded library reports it, the kernel changing with
OPENBLAS_CORETYPE in a fresh process; only NumPy's own BLAS counted as NumPy's; torch's report;
CuPy's cuBLAS (a stand-in module: no GPU here); "unknown" with the reason, never a traceback, when
threadpoolctl or torch is missing or reports less; the header, the JSON and stderr of the bench.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from adalora_ref import bench, bench_env, bench_measure
from adalora_ref.bench_env import PINS, Library
from adalora_ref.bench_report import Report, format_report, report_dict
from adalora_ref.cli import main

NUMPY_FOLDER = Path(np.__file__).resolve().parent


@pytest.fixture
def no_pins(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with none of the pinning variables (this machine sets OPENBLAS_CORETYPE)."""
    for pin in PINS:
        monkeypatch.delenv(pin.variable, raising=False)
    return monkeypatch


def blas_library(filepath: Path | str, architecture: str | None = "Haswell") -> Library:
    return Library("blas", "openblas", "0.3.27", "pthreads", 2, architecture, str(filepath))


# -- the pinned variables ---------------------------------------------------------------------


def test_without_the_variables_there_is_no_warning(no_pins: pytest.MonkeyPatch) -> None:
    environment = bench_env.describe()
    assert environment.pins == [] and environment.warnings == []
    assert environment.text.startswith("BLAS: NumPy ") and "Warning" not in environment.text


def test_each_pinning_variable_is_reported_with_the_side_it_affects(no_pins: pytest.MonkeyPatch) -> None:
    no_pins.setenv("OPENBLAS_CORETYPE", "Haswell")
    no_pins.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    no_pins.setenv("OMP_NUM_THREADS", "1")
    no_pins.setenv("MKL_DEBUG_CPU_TYPE", "   ")  # blank: not a pin
    environment = bench_env.describe()
    assert [p.pin.variable for p in environment.pins] == [
        "OPENBLAS_CORETYPE",
        "OMP_NUM_THREADS",
        "MKL_ENABLE_INSTRUCTIONS",
    ]
    warnings = environment.text.splitlines()[1:]
    assert warnings[0].startswith("Warning: OPENBLAS_CORETYPE=Haswell is set, for NumPy (OpenBLAS): OpenBLAS runs")
    assert warnings[1].startswith("Warning: OMP_NUM_THREADS=1 is set, for torch (OpenMP) and NumPy")
    assert warnings[2].startswith("Warning: MKL_ENABLE_INSTRUCTIONS=AVX2 is set, for torch (MKL)")
    assert environment.warnings[2] == {
        "variable": "MKL_ENABLE_INSTRUCTIONS",
        "value": "AVX2",
        "affects": "torch (MKL), and NumPy where it is built on MKL",
        "effect": "caps the instruction set of MKL's kernels (e.g. AVX2 on an AVX-512 CPU)",
    }


def test_pins_are_read_from_a_given_environment() -> None:
    pins = bench_env.pinned_variables({"OPENBLAS_NUM_THREADS": "4", "UNRELATED": "1", "ATEN_CPU_CAPABILITY": ""})
    assert [(p.pin.variable, p.value, p.pin.affects) for p in pins] == [
        ("OPENBLAS_NUM_THREADS", "4", "NumPy (OpenBLAS), and torch through the bench")
    ]


# -- NumPy's BLAS -----------------------------------------------------------------------------


def test_numpy_blas_is_the_loaded_library() -> None:
    side = bench_env.describe().numpy
    assert side["unknown"] is None and side["libraries"]
    for lib in side["libraries"]:
        assert lib.user_api == "blas" and lib.internal_api and lib.num_threads >= 1
        assert lib.text.startswith(f"{lib.internal_api} {lib.version} (")
    assert bench_env.numpy_blas_threads() == max(lib.num_threads for lib in side["libraries"])


def test_the_kernel_reported_is_the_one_openblas_runs() -> None:
    """In a fresh process OPENBLAS_CORETYPE chooses the kernel: the report follows it."""
    libraries = bench_env.describe().numpy["libraries"]
    if platform.machine() != "x86_64" or libraries[0].internal_api != "openblas":
        pytest.skip(f"needs NumPy on an x86_64 OpenBLAS, here {libraries[0].internal_api} on {platform.machine()}")
    probe = "from adalora_ref import bench_env; print(bench_env.describe().numpy['libraries'][0].architecture)"
    for coretype in ("Sandybridge", "Nehalem"):
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_CORETYPE": coretype}
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == coretype


def test_only_numpys_own_blas_counts_as_numpys() -> None:
    own = blas_library(NUMPY_FOLDER.with_name("numpy.libs") / "libscipy_openblas64_.so", "SkylakeX")
    scipys = blas_library(NUMPY_FOLDER.with_name("scipy.libs") / "libscipy_openblas.so")
    openmp = Library("openmp", "openmp", None, None, 2, None, "/opt/torch/lib/libgomp.so.1")
    assert bench_env.numpy_blas([scipys, openmp, own]) == {"libraries": [own], "unknown": None}
    # a NumPy linked to a BLAS outside its folders (a distribution's): every BLAS loaded is listed
    system = blas_library("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    assert bench_env.numpy_blas([system, openmp]) == {"libraries": [system], "unknown": None}
    assert bench_env.numpy_blas([openmp]) == {"libraries": [], "unknown": "threadpoolctl finds no BLAS library loaded"}


def test_without_threadpoolctl_numpys_blas_is_unknown(no_pins: pytest.MonkeyPatch) -> None:
    no_pins.setitem(sys.modules, "threadpoolctl", None)  # `import threadpoolctl` now raises ImportError
    environment = bench_env.describe()
    assert environment.numpy["libraries"] == []
    assert environment.numpy["unknown"].startswith("threadpoolctl is not installed (")
    assert environment.text.startswith("BLAS: NumPy BLAS unknown (threadpoolctl is not installed (")
    assert "; pip install threadpoolctl)" in environment.text.splitlines()[0]
    assert bench_env.numpy_blas_threads() is None
    no_pins.setenv("OMP_NUM_THREADS", "3")
    assert bench.blas_threads() == 3  # the environment's count, as before threadpoolctl


def test_blas_threads_is_the_count_the_library_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "numpy_blas_threads", lambda: 5)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert bench.blas_threads() == 5


# -- torch and CuPy ---------------------------------------------------------------------------


def test_torch_reports_its_blas_kernels_and_threads() -> None:
    torch = pytest.importorskip("torch", reason="torch's report needs torch (pip install .[golden])")
    side = bench_env.describe().torch
    assert side is not None
    assert side["version"] == torch.__version__ and side["num_threads"] == torch.get_num_threads()
    assert side["blas"] is not None and side["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    folder = Path(torch.__file__).resolve().parent
    for lib in side["libraries"]:  # the libraries in torch's folders only (here its OpenMP runtime)
        assert any(Path(lib.filepath).resolve().is_relative_to(f) for f in (folder, folder.with_name("torch.libs")))
    line = bench_env.describe().text.splitlines()[0]
    assert f"; torch {side['blas']}" in line and f"{side['num_threads']} threads" in line


def test_without_torch_there_is_no_torch_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    environment = bench_env.describe()
    assert environment.torch is None and environment.as_dict()["torch"] is None
    assert "torch" not in environment.text.splitlines()[0]


def test_a_torch_that_reports_nothing_is_unknown_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    bare = types.ModuleType("torch")  # no __config__, backends, get_num_threads or cuda
    monkeypatch.setitem(sys.modules, "torch", bare)
    side = bench_env.describe().torch
    assert side is not None and side["libraries"] == []
    assert all(value is None for key, value in side.items() if key != "libraries")
    line = bench_env.describe().text.splitlines()[0]
    assert "; torch unknown (unknown, unknown threads, CPU capability unknown, oneDNN unknown)" in line


def fake_cupy(cublas_handle: object) -> types.SimpleNamespace:
    """A stand-in for CuPy with the calls bench_env makes (there is no GPU on this machine)."""
    runtime = types.SimpleNamespace(
        runtimeGetVersion=lambda: 12040, getDeviceProperties=lambda device: {"name": b"NVIDIA H200"}
    )
    cuda = types.SimpleNamespace(
        cublas=types.SimpleNamespace(getVersion=lambda handle: 120402 if handle == 7 else -1),
        device=types.SimpleNamespace(get_cublas_handle=cublas_handle),
        runtime=runtime,
        Device=lambda: types.SimpleNamespace(id=0),
    )
    return types.SimpleNamespace(__version__="13.6.0", cuda=cuda)


def test_cupy_reports_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(lambda: 7))
    environment = bench_env.describe()
    assert environment.cupy == {"version": "13.6.0", "cublas": 120402, "cuda_runtime": 12040, "gpu": "NVIDIA H200"}
    assert environment.text.splitlines()[0].endswith("; CuPy cuBLAS 120402, CUDA runtime 12040 on NVIDIA H200")


def test_a_cupy_without_a_device_says_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_device() -> int:
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(no_device))
    environment = bench_env.describe()
    assert environment.cupy is not None and environment.cupy["cublas"] is None
    assert "CuPy cuBLAS unknown, CUDA runtime 12040" in environment.text


def test_cpu_instruction_set(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert bench_env.cpu_instruction_set(str(cpuinfo)) == "AVX2"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx2\n")
    assert bench_env.cpu_instruction_set(str(cpuinfo)) == "AVX-512"
    cpuinfo.write_text("processor\t: 0\n")
    assert bench_env.cpu_instruction_set(str(cpuinfo)) is None
    assert bench_env.cpu_instruction_set(str(tmp_path / "missing")) is None


# -- the bench's header, JSON and stderr ------------------------------------------------------


def test_the_report_says_what_it_ran_on(no_pins: pytest.MonkeyPatch) -> None:
    no_pins.setenv("OPENBLAS_CORETYPE", "Haswell")
    report = Report(bench.make_setup("numpy", "float32", with_peft=False), bench.SIZES["small"], 1)
    header = format_report(report).splitlines()
    assert header[0].startswith("adalora-ref bench: reference on numpy float32")
    assert header[1] == bench_env.describe().text.splitlines()[0] and header[1].startswith("BLAS: NumPy ")
    assert header[2].startswith("Warning: OPENBLAS_CORETYPE=Haswell is set, for NumPy (OpenBLAS)")
    data = json.loads(json.dumps(report_dict(report)))  # plain data all through
    assert set(data["blas"]) == {"numpy", "torch", "cupy"}
    numpy_side = data["blas"]["numpy"]
    assert numpy_side["unknown"] is None
    assert set(numpy_side["libraries"][0]) == {
        "user_api",
        "internal_api",
        "version",
        "threading_layer",
        "num_threads",
        "architecture",
        "filepath",
    }
    assert [w["variable"] for w in data["environment_warnings"]] == ["OPENBLAS_CORETYPE"]


def test_the_command_warns_on_stderr_and_in_the_json(
    no_pins: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_pins.setattr(bench_measure, "SETTLE_S", 0.0)
    no_pins.setitem(sys.modules, "torch", None)  # the reference side alone: quicker, and torch need not be here
    no_pins.setitem(sys.modules, "peft", None)
    no_pins.setenv("MKL_CBWR", "AVX2")
    report_file = tmp_path / "report.json"
    argv = ["bench", "--sizes", "small", "--rounds", "1", "--only", "layer", "--json", str(report_file)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "adalora-ref bench: warning: MKL_CBWR=AVX2 is set, for torch (MKL)" in captured.err
    assert "\nWarning: MKL_CBWR=AVX2 is set" in captured.out
    data = json.loads(report_file.read_text())
    assert [w["variable"] for w in data["environment_warnings"]] == ["MKL_CBWR"]
    assert data["blas"]["torch"] is None and data["blas"]["numpy"]["libraries"]
