"""How the benchmark measures: the two sides timed in turns, the bandwidth of a large copy (the
floor), glibc's malloc thresholds fixed for the run, and memory growth from step to step.
bench.py builds the workloads these functions measure; its docstring says what each one computes."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass

import array_api_compat
import numpy as np

from ._backend import dtype_by_name
from .bench import Setup, Side

SETTLE_S = 0.05
"""Pause before each block of runs. OpenBLAS's and OpenMP's worker threads spin for a while after
their last task, and a side timed while the other side's threads still spin on the same cores runs
up to 2x slower (measured on 2 cores: peft's layer fwd+bwd 57 ms right after ours, 26 ms alone)."""


def time_sides(sides: Sequence[Side], rounds: int, block: int = 5) -> list[list[float]]:
    """Seconds of `rounds` runs of each side. The sides take turns in blocks of `block` runs, each
    block after a pause (SETTLE_S) and one untimed run, so that neither side is timed while the
    other's threads still hold the cores, and a machine busy with other work slows both alike.
    Python's garbage collector is off while timing, as in `timeit`."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    times: list[list[float]] = [[] for _ in sides]
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        while len(times[0]) < rounds:
            n = min(block, rounds - len(times[0]))
            for side, record in zip(sides, times, strict=True):
                time.sleep(SETTLE_S)
                side.run()
                side.sync()
                for _ in range(n):
                    start = time.perf_counter()
                    side.run()
                    side.sync()
                    record.append(time.perf_counter() - start)
    finally:
        if gc_was_on:
            gc.enable()
    return times


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h


def steady_malloc() -> bool:
    """Fix glibc malloc's trim and mmap thresholds for this process; True when set (glibc only).

    glibc adapts both thresholds to the largest block freed so far. Once torch has freed a few
    megabytes, the reference's allocator step (new arrays of megabytes every step, the previous
    ones freed: 24 MB when this was measured, 8 MB of sensitivities and temporaries since the
    averages are updated in place) makes the heap grow and shrink every step, and every step
    refaults ~3,000 pages: measured 12.7 ms a step instead of 5.9 ms, in two runs of three. Fixed
    thresholds (trim at 1 GiB, mmap at 32 MiB, the most glibc allows) keep the timings of both sides
    independent of what ran before them in the process; the setting is the same for both.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(GLIBC_M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, 32 << 20))


def copy_bandwidth(setup: Setup, nbytes: int, rounds: int = 5) -> float:
    """Bytes per second of a large array copy on the reference's backend (bytes read + bytes written
    over the fastest copy): the memory bandwidth the floor divides by. `nbytes` should be several
    times the last-level cache."""
    xp = setup.xp
    dtype = dtype_by_name(xp, setup.dtype_name)
    itemsize = np.dtype(setup.dtype_name).itemsize
    n = nbytes // itemsize
    src, dst = xp.ones((n,), dtype=dtype), xp.zeros((n,), dtype=dtype)

    def copy() -> None:
        dst[...] = src

    best = min(time_sides([Side(copy, setup.sync_ours, dict)], rounds)[0])
    return 2 * n * itemsize / best


MEMORY_NOISE_BYTES = 4096
"""Growth below this between the two halves is Python's own bookkeeping (new int objects, dict
resizes, tracemalloc's tables), not the reference's: one array leaked per step adds at least
100 x 112 bytes (a NumPy array's header alone) over a half of 100 steps."""


@dataclass
class MemoryGrowth:
    """The most memory the reference held during the first and the second half of `steps` runs."""

    name: str
    steps: int
    first_peak: int
    second_peak: int
    how: str  # "tracemalloc" or "cupy pool"

    @property
    def growth(self) -> int:
        return self.second_peak - self.first_peak

    @property
    def grows(self) -> bool:
        return self.growth > MEMORY_NOISE_BYTES


def memory_growth(setup: Setup, side: Side, name: str, steps: int) -> MemoryGrowth | None:
    """Run `side` `steps` times and compare the peaks of the two halves.

    Host backends (numpy, array_api_strict) are measured with tracemalloc (NumPy reports its
    buffers to it), after a full garbage collection before each half (Python frees some objects
    only in its occasional full collections; that is not growth); cupy with its memory pool's bytes
    in use after each step. None for torch, whose CPU allocator tracemalloc does not see.
    """
    if steps < 2:
        raise ValueError(f"memory growth needs at least 2 steps (two halves), got {steps}")
    half = steps // 2
    if array_api_compat.is_cupy_namespace(setup.xp):
        import cupy

        pool = cupy.get_default_memory_pool()
        peaks = []
        for _ in range(2):
            peak = 0
            for _ in range(half):
                side.run()
                side.sync()
                peak = max(peak, pool.used_bytes())
            peaks.append(peak)
        return MemoryGrowth(name, steps, peaks[0], peaks[1], "cupy pool")
    if array_api_compat.is_torch_namespace(setup.xp):
        return None
    tracemalloc.start()
    try:
        peaks = []
        for _ in range(2):
            gc.collect()
            tracemalloc.reset_peak()
            for _ in range(half):
                side.run()
            peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return MemoryGrowth(name, steps, peaks[0], peaks[1], "tracemalloc")
