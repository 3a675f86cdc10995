"""Benchmark workloads: the reference and PyTorch peft on the same work, and how they are measured.

Every workload draws its inputs once from a seeded NumPy generator and builds them twice: for the
reference on the chosen backend (numpy, array_api_strict, torch on CPU, cupy) and for peft 0.21.2
on torch (on the CPU, or on CUDA when the backend is cupy). Same shapes, same values, same dtype,
and torch gets the thread count NumPy's BLAS uses (`blas_threads`). What each side computes:

    layer forward      y = x W^T + b + (x (A*E)^T B^T) * scaling / (ranknum + 1e-5)
                       ours: SVDLinear.forward;  peft: its SVDLinear called under torch.no_grad()
    layer fwd+bwd      that forward, then dL/dx, dL/dA, dL/dE and dL/dB from a given dL/dy; no
                       dL/dW or dL/db on either side (the base layer is frozen)
                       ours: SVDLinear.forward + backward;  peft: forward + y.backward(dL/dy)
    allocator step     at a masking step of the budgeting phase: ipt, exp_avg_ipt and exp_avg_unc of
                       every A, E and B, the triplet scores, the budget, the k-th smallest score, E
                       masked, the rank pattern
                       ours: RankAllocator.update_and_allocate, the masked E put back into the params;
                       peft: AdaLoraModel.update_and_allocate (it masks E in place)
    train step         forward, MSE loss + orthogonal term, backward, AdamW, update_and_allocate
                       ours: training.train_step;  peft: base_model(x, y).loss.backward(),
                       AdamW.step(), update_and_allocate(step), zero_grad()
    floor              the bytes the allocator step must move (p and grad read; ipt written;
                       exp_avg_ipt and exp_avg_unc read and written) over the bandwidth of a large
                       array copy measured in the same run: the time no implementation can beat

Timing (`bench_measure.time_sides`): the two sides take turns, block after block, so that anything else on the
machine slows both alike; each side reports its median. On glibc the runs fix malloc's thresholds
first (`bench_measure.steady_malloc`): otherwise what torch allocated decides whether the reference refaults its
state every step, and its time doubles. Memory (`bench_measure.memory_growth`): the peak the
reference holds during the first and the second half of many steps (tracemalloc on the host, the
CuPy memory pool on a GPU); a later peak above the earlier one means memory grows from step to step.

This module builds the workloads; bench_measure.py times them and measures their memory;
bench_report.py runs them all and writes the report (`adalora-ref bench`), and the
pytest-benchmark files in bench/ run the same workloads.
Unlike the math modules it knows torch and peft by name: it drives them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ._backend import dtype_by_name, from_numpy, get_backend, to_numpy
from .allocator import RankAllocator
from .bench_env import numpy_blas_threads
from .config import AdaLoraConfig
from .layer import SVDLinear, SVDTriplet, TripletGrads
from .mlp import MLP, mse_loss
from .model import AdaLoraModel, BaseLinear
from .optim import AdamW
from .training import train_step

LORA_ALPHA = 8
PARTS = ("lora_A", "lora_E", "lora_B")
BLOCK = (("q", "h", "h"), ("k", "h", "h"), ("v", "h", "h"), ("o", "h", "h"), ("fc1", "h", "f"), ("fc2", "f", "h"))
"""One transformer block of DeBERTa-base as AdaLoRA's paper adapts it: q, k, v, o (hidden -> hidden),
fc1 (hidden -> ffn), fc2 (ffn -> hidden)."""

MLP_LAYERS = (("fc1", 8, 16), ("fc2", 16, 12), ("fc3", 12, 10), ("head", 10, 4))
"""The MLP of the live trajectory test (tests/test_peft_trajectory.py): fc1, fc2, fc3 adapted, head frozen."""


@dataclass(frozen=True)
class Sizes:
    """The shapes and repetition counts of one run of the benchmarks."""

    name: str
    layers: tuple[tuple[int, int, int], ...]  # (in, out, tokens) of each layer benchmark
    layer_r: int
    blocks: int  # transformer blocks of the allocator step
    hidden: int
    ffn: int
    init_r: int
    target_r: int
    mlp_init_r: int
    mlp_target_r: int
    batch: int  # rows of one MLP training batch
    rounds: int  # timed runs of each side
    copy_mib: int  # size of the array copied to measure the memory bandwidth
    memory_steps: int  # steps of the memory-growth runs (the peak of the second half vs the first)


SIZES = {
    "paper": Sizes(
        name="paper",
        layers=((768, 768, 2048), (1024, 4096, 1024)),
        layer_r=12,
        blocks=12,
        hidden=768,
        ffn=3072,
        init_r=12,
        target_r=8,
        mlp_init_r=6,
        mlp_target_r=3,
        batch=16,
        rounds=25,
        copy_mib=512,
        memory_steps=200,
    ),
    "small": Sizes(
        name="small",
        layers=((32, 32, 64), (16, 48, 32)),
        layer_r=4,
        blocks=2,
        hidden=16,
        ffn=48,
        init_r=4,
        target_r=2,
        mlp_init_r=6,
        mlp_target_r=3,
        batch=16,
        rounds=3,
        copy_mib=4,
        memory_steps=20,
    ),
}
"""`paper`: the issue's shapes (layers of DeBERTa-base and of a 1024 -> 4096 projection, 72 triplets
for the allocator). `small`: the same workloads at toy sizes, a smoke run of a few seconds."""


# -- the two sides ----------------------------------------------------------------------------


def blas_threads() -> int:
    """The threads NumPy's BLAS runs on, as the loaded library reports them (bench_env, threadpoolctl);
    where that is unknown: OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else MKL_NUM_THREADS, else every
    core this process may use. torch is given the same count."""
    reported = numpy_blas_threads()
    if reported is not None:
        return reported
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Setup:
    """Where each side runs: the reference's backend and dtype, and torch + peft (None when missing)."""

    backend: str
    xp: Any
    dtype_name: str
    torch: Any | None
    peft: Any | None
    peft_device: str  # "cpu", or "cuda" when the reference runs on cupy
    no_peft_reason: str | None  # why the peft side is skipped, when it is
    threads: int

    def array(self, value: np.ndarray) -> Any:
        """A NumPy value as an array of the reference's backend and dtype."""
        return from_numpy(self.xp, np.asarray(value), dtype=dtype_by_name(self.xp, self.dtype_name))

    def tensor(self, value: np.ndarray) -> Any:
        """A NumPy value as a torch tensor for peft, in the same dtype."""
        assert self.torch is not None
        dtype = getattr(self.torch, self.dtype_name)
        return self.torch.as_tensor(np.ascontiguousarray(value), dtype=dtype, device=self.peft_device)

    def without_peft(self, reason: str) -> Setup:
        """The same reference side, with the peft side switched off for `reason`."""
        return Setup(self.backend, self.xp, self.dtype_name, None, None, self.peft_device, reason, self.threads)

    def sync_ours(self) -> None:
        """Wait for the reference's device (a no-op on the host)."""
        if array_api_compat.is_cupy_namespace(self.xp):
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def sync_peft(self) -> None:
        if self.torch is not None and self.peft_device == "cuda":
            self.torch.cuda.synchronize()


def make_setup(backend: str = "numpy", dtype_name: str = "float32", with_peft: bool = True) -> Setup:
    """The reference on `backend` and peft beside it when torch and peft can be imported.

    Raises ValueError for an unknown backend or dtype and ImportError (with the reason) when the
    backend cannot run here (cupy not installed, or no GPU). A missing peft is not an error: the
    setup says why its side is skipped. peft runs on CUDA when the backend is cupy, else on the
    CPU with torch.set_num_threads(blas_threads()).
    """
    xp = get_backend(backend)
    dtype_by_name(xp, dtype_name)
    threads = blas_threads()
    peft_device = "cuda" if backend == "cupy" else "cpu"
    setup = Setup(backend, xp, dtype_name, None, None, peft_device, "not asked for", threads)
    if not with_peft:
        return setup
    try:
        import peft
        import torch
    except ImportError as err:
        return setup.without_peft(f"torch and peft are not installed ({err}); pip install 'adalora-ref[golden]'")
    if peft_device == "cuda" and not torch.cuda.is_available():
        return setup.without_peft("the reference runs on cupy but torch sees no CUDA device")
    torch.set_num_threads(threads)
    return Setup(backend, xp, dtype_name, torch, peft, peft_device, None, threads)


@dataclass
class Side:
    """One side of a benchmark: `run` does one unit of the work, `sync` waits for its device,
    `outputs` gives the results of the last run as float64 NumPy arrays by name (for comparisons)."""

    run: Callable[[], None]
    sync: Callable[[], None]
    outputs: Callable[[], dict[str, np.ndarray]]


@dataclass
class Workload:
    """The same work for the reference (`ours`) and for peft (`peft`, None when peft is missing)."""

    name: str
    ours: Side
    peft: Side | None
    bytes_moved: int | None = None  # the bytes one run must read and write, where a floor is defined


def _t2n(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy().copy()  # a copy: torch updates its tensors in place


def _n(x: Any) -> np.ndarray:
    return np.array(to_numpy(x), dtype=np.float64)  # a copy: never alias the reference's state


# -- (a) the SVD layer ------------------------------------------------------------------------


def layer_workload(setup: Setup, n_in: int, n_out: int, tokens: int, r: int, backward: bool, seed: int = 0) -> Workload:
    """One SVDLinear (n_in -> n_out, rank r, with bias) on a (tokens, n_in) input: the forward, or
    the forward and the backward (dL/dx, dL/dA, dL/dE, dL/dB) for a fixed dL/dy."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(n_out, n_in)) / math.sqrt(n_in), rng.normal(size=n_out) / 10
    A, E, B = rng.normal(0, 0.02, (r, n_in)), rng.normal(size=(r, 1)), rng.normal(0, 0.02, (n_out, r))
    x, grad_y = rng.normal(size=(tokens, n_in)), rng.normal(size=(tokens, n_out))
    name = f"layer {'fwd+bwd' if backward else 'forward'} {n_in}->{n_out}, {tokens} tokens, r={r}"

    a = setup.array
    layer = SVDLinear(a(W), a(b), SVDTriplet(a(A), a(E), a(B)), lora_alpha=LORA_ALPHA, name="proj")
    x_ours, grad_y_ours = a(x), a(grad_y)
    last: dict[str, Any] = {}

    def run_ours() -> None:
        y, cache = layer.forward(x_ours)  # (tokens, n_out)
        last["y"] = y
        if backward:
            last["grad_x"], grads = layer.backward(cache, grad_y_ours)  # (tokens, n_in)
            last.update({f"grad_{part}": getattr(grads, part) for part in PARTS})

    ours = Side(run_ours, setup.sync_ours, lambda: {k: _n(v) for k, v in last.items()})
    if setup.torch is None:
        return Workload(name, ours, None)

    torch, peft = setup.torch, setup.peft
    root = torch.nn.Module()
    root.add_module("proj", torch.nn.Linear(n_in, n_out))
    config = peft.AdaLoraConfig(
        init_r=r, target_r=min(8, r), total_step=10, target_modules=["proj"], lora_alpha=LORA_ALPHA
    )
    model = peft.get_peft_model(root, config).to(device=setup.peft_device, dtype=getattr(torch, setup.dtype_name))
    peft_layer = model.base_model.model.proj
    params = [peft_layer.lora_A["default"], peft_layer.lora_E["default"], peft_layer.lora_B["default"]]
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(setup.tensor(W))
        peft_layer.base_layer.bias.copy_(setup.tensor(b))
        for p, value in zip(params, (A, E, B), strict=True):
            p.copy_(setup.tensor(value))
    x_peft, grad_y_peft = setup.tensor(x), setup.tensor(grad_y)
    peft_last: dict[str, Any] = {}

    def run_peft() -> None:
        if not backward:
            with torch.no_grad():
                peft_last["y"] = peft_layer(x_peft)
            return
        for p in params:
            p.grad = None  # as optimizer.zero_grad(): no accumulation into old gradients
        x_in = x_peft.detach().requires_grad_(True)
        y = peft_layer(x_in)
        y.backward(grad_y_peft)
        peft_last.update(
            y=y, grad_x=x_in.grad, **{f"grad_{part}": p.grad for part, p in zip(PARTS, params, strict=True)}
        )

    peft_side = Side(run_peft, setup.sync_peft, lambda: {k: _t2n(v) for k, v in peft_last.items()})
    return Workload(name, ours, peft_side)


# -- (b) one allocator step -------------------------------------------------------------------


def allocator_layers(sizes: Sizes) -> list[tuple[str, int, int]]:
    """(name, in, out) of every adapted layer: `blocks` blocks of q, k, v, o, fc1, fc2."""
    dim = {"h": sizes.hidden, "f": sizes.ffn}
    return [(f"blocks.{i}.{n}", dim[a], dim[b]) for i in range(sizes.blocks) for n, a, b in BLOCK]


def allocator_bytes(layers: Sequence[tuple[str, int, int]], r: int, itemsize: int) -> int:
    """What one importance update must move at the least: for every element of every A, E and B,
    p and grad read, ipt written, exp_avg_ipt and exp_avg_unc read and written (7 arrays). The scores,
    the threshold and the masked E are r values per layer: negligible."""
    elements = sum(r * n_in + r + n_out * r for _, n_in, n_out in layers)
    return 7 * elements * itemsize


def allocator_workload(
    setup: Setup, sizes: Sizes, seed: int = 0, total_step: int = 10_000, fused: bool = False
) -> Workload:
    """One update_and_allocate at a masking step, every run a new step of the budgeting phase.

    The schedule: tinit 0, tfinal 0, deltaT 1, so every step masks; the steps start at
    total_step // 5 (a budget well below init_bgt). p and grad are fixed draws; E loses its masked
    rows on both sides, as in training. `fused`: ours is fused.FusedRankAllocator (numba, NumPy only;
    ImportError without numba, fused.FusedPathError on another backend), timed after one warm-up step that compiles it.
    """
    layers = allocator_layers(sizes)
    r = sizes.init_r
    rng = np.random.default_rng(seed)
    values = {  # layer -> part -> (p, grad)
        name: {
            "lora_A": (rng.normal(0, 0.02, (r, n_in)), rng.normal(0, 1e-3, (r, n_in))),
            "lora_E": (rng.normal(size=(r, 1)), rng.normal(0, 1e-3, (r, 1))),
            "lora_B": (rng.normal(0, 0.02, (n_out, r)), rng.normal(0, 1e-3, (n_out, r))),
        }
        for name, n_in, n_out in layers
    }
    schedule = {"target_r": sizes.target_r, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": total_step}
    first_step = total_step // 5
    name = f"allocator step{' (fused)' if fused else ''}, {len(layers)} triplets"
    moved = allocator_bytes(layers, r, np.dtype(setup.dtype_name).itemsize)

    a = setup.array
    params = {n: SVDTriplet(*(a(v[part][0]) for part in PARTS)) for n, v in values.items()}
    grads = {n: TripletGrads(*(a(v[part][1]) for part in PARTS)) for n, v in values.items()}
    allocator_class = _fused_allocator_class(setup) if fused else RankAllocator
    allocator = allocator_class({name: r for name, _, _ in layers}, **schedule)
    ours_state: dict[str, Any] = {"step": first_step}

    def run_ours() -> None:
        allocation = allocator.update_and_allocate(params, grads, ours_state["step"])
        for layer_name, E in allocation.lora_E.items():  # what peft's masked_fill_ does to E
            params[layer_name] = SVDTriplet(params[layer_name].lora_A, E, params[layer_name].lora_B)
        ours_state["step"] += 1
        ours_state["allocation"] = allocation

    def ours_outputs() -> dict[str, np.ndarray]:
        allocation = ours_state["allocation"]
        out = {"budget": np.asarray([float(allocation.budget)])}
        for layer_name in params:
            out[f"{layer_name}.lora_E"] = _n(params[layer_name].lora_E)
            out[f"{layer_name}.keep"] = np.asarray(allocation.rank_pattern[layer_name], dtype=np.float64)
            for part in PARTS:
                out[f"{layer_name}.{part}.exp_avg_unc"] = _n(allocator.state[layer_name][part].exp_avg_unc)
        return out

    ours = Side(run_ours, setup.sync_ours, ours_outputs)
    if setup.torch is None:
        return Workload(name, ours, None, moved)

    torch, peft = setup.torch, setup.peft
    root = torch.nn.Module()
    blocks = torch.nn.ModuleList()
    dim = {"h": sizes.hidden, "f": sizes.ffn}
    for _ in range(sizes.blocks):
        block = torch.nn.Module()
        for n, i, o in BLOCK:  # uninitialized base weights: the allocator never reads them
            block.add_module(n, torch.nn.utils.skip_init(torch.nn.Linear, dim[i], dim[o]))
        blocks.append(block)
    root.add_module("blocks", blocks)
    config = peft.AdaLoraConfig(init_r=r, target_modules=[n for n, _, _ in BLOCK], lora_alpha=LORA_ALPHA, **schedule)
    model = peft.get_peft_model(root, config).to(device=setup.peft_device, dtype=getattr(torch, setup.dtype_name))
    inner = model.base_model.model
    with torch.no_grad():
        for layer_name, v in values.items():
            module = inner.get_submodule(layer_name)
            for part in PARTS:
                p = getattr(module, part)["default"]
                p.copy_(setup.tensor(v[part][0]))
                p.grad = setup.tensor(v[part][1])
    peft_state = {"step": first_step}

    def run_peft() -> None:
        model.base_model.update_and_allocate(peft_state["step"])
        peft_state["step"] += 1

    def peft_outputs() -> dict[str, np.ndarray]:
        allocator_peft = model.base_model.rankallocator
        budget = allocator_peft.budget_schedule(peft_state["step"] - 1)[0]
        out = {"budget": np.asarray([float(budget)])}
        for layer_name in values:
            module = inner.get_submodule(layer_name)
            out[f"{layer_name}.lora_E"] = _t2n(module.lora_E["default"])
            out[f"{layer_name}.keep"] = np.asarray(
                config.rank_pattern[f"{layer_name}.lora_E.default"], dtype=np.float64
            )
            for part in PARTS:
                out[f"{layer_name}.{part}.exp_avg_unc"] = _t2n(
                    allocator_peft.exp_avg_unc[f"{layer_name}.{part}.default"]
                )
        return out

    return Workload(name, ours, Side(run_peft, setup.sync_peft, peft_outputs), moved)


def _fused_allocator_class(setup: Setup) -> type[RankAllocator]:
    """FusedRankAllocator, compiled (numba caches the machine code on disk, so mostly a load) by one
    step on a tiny triplet: compilation stays outside every timed run."""
    from .fused import FusedPathError, FusedRankAllocator

    if setup.backend != "numpy":
        raise FusedPathError(f"the fused allocator step is NumPy-only, the reference runs on {setup.backend}")
    warm_up = FusedRankAllocator({"warm_up": 1}, target_r=1, tinit=0, tfinal=0, total_step=10)
    a = setup.array
    ones = [a(np.ones(shape)) for shape in ((1, 2), (1, 1), (2, 1))]
    warm_up.update_and_allocate({"warm_up": SVDTriplet(*ones)}, {"warm_up": TripletGrads(*ones)}, 1)
    return FusedRankAllocator


# -- (c) one training step of the MLP ---------------------------------------------------------


def train_step_workload(setup: Setup, sizes: Sizes, seed: int = 0, total_step: int = 10_000) -> Workload:
    """One whole training step of the MLP of the live trajectory test (MLP_LAYERS), batch `sizes.batch`:
    forward, MSE + orthogonal term (weight 0.5), backward, AdamW (lr 0.02) on A, E and B,
    update_and_allocate. Every run is a new step of the budgeting phase (deltaT 1: it masks)."""
    rng = np.random.default_rng(seed)
    base = {name: (rng.normal(size=(o, i)) / math.sqrt(i), rng.normal(size=o) / 10) for name, i, o in MLP_LAYERS}
    targets = [name for name, _, _ in MLP_LAYERS[:-1]]
    r = sizes.mlp_init_r
    lora = {
        name: (rng.normal(0, 0.02, (r, i)), rng.normal(size=(r, 1)) / 10, rng.normal(0, 0.02, (o, r)))
        for name, i, o in MLP_LAYERS[:-1]
    }
    n_out = MLP_LAYERS[-1][2]
    x, target = rng.normal(size=(sizes.batch, MLP_LAYERS[0][1])), rng.normal(size=(sizes.batch, n_out))
    schedule = {
        "init_r": r,
        "target_r": sizes.mlp_target_r,
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
        "total_step": total_step,
        "lora_alpha": LORA_ALPHA,
        "orth_reg_weight": 0.5,
    }
    first_step = total_step // 5
    name = f"train step, MLP {'-'.join(str(i) for _, i, _ in MLP_LAYERS)}-{n_out}, batch {sizes.batch}"

    a = setup.array
    config = AdaLoraConfig(target_modules=targets, **schedule)
    model = AdaLoraModel({n: BaseLinear(a(W), a(b)) for n, (W, b) in base.items()}, config)
    model.set_triplets({n: SVDTriplet(*(a(v) for v in lora[n])) for n in targets})
    net, optimizer = MLP(model), AdamW(lr=0.02)
    x_ours, target_ours = a(x), a(target)
    ours_state: dict[str, Any] = {"step": first_step}

    def run_ours() -> None:
        ours_state["loss"] = train_step(net, optimizer, x_ours, target_ours, ours_state["step"], mse_loss).loss
        ours_state["step"] += 1

    def ours_outputs() -> dict[str, np.ndarray]:
        out = {"loss": np.asarray([ours_state["loss"]])}
        for n, t in model.triplets().items():
            out.update({f"{n}.{part}": _n(getattr(t, part)) for part in PARTS})
        return out

    ours = Side(run_ours, setup.sync_ours, ours_outputs)
    if setup.torch is None:
        return Workload(name, ours, None)

    torch, peft = setup.torch, setup.peft

    class Net(torch.nn.Module):
        """The MLP whose forward returns `.loss`: the path on which peft adds the orthogonal term."""

        def __init__(self) -> None:
            super().__init__()
            for n, i, o in MLP_LAYERS:
                self.add_module(n, torch.nn.Linear(i, o))

        def forward(self, h: Any, y: Any) -> Any:
            for k, (n, _, _) in enumerate(MLP_LAYERS):
                h = getattr(self, n)(h)
                if k < len(MLP_LAYERS) - 1:
                    h = torch.relu(h)
            return _Output(torch.nn.functional.mse_loss(h, y))

    peft_config = peft.AdaLoraConfig(target_modules=targets, **schedule)
    peft_model = peft.get_peft_model(Net(), peft_config)
    peft_model = peft_model.to(device=setup.peft_device, dtype=getattr(torch, setup.dtype_name))
    inner = peft_model.base_model.model
    lora_params = []
    with torch.no_grad():
        for n, (W, b) in base.items():
            module = getattr(inner, n)
            linear = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            linear.weight.copy_(setup.tensor(W))
            linear.bias.copy_(setup.tensor(b))
        for n in targets:
            module = getattr(inner, n)
            for part, value in zip(PARTS, lora[n], strict=True):
                getattr(module, part)["default"].copy_(setup.tensor(value))
                lora_params.append(getattr(module, part)["default"])
    peft_optimizer = torch.optim.AdamW(lora_params, lr=0.02)  # only A, E, B (never ranknum)
    x_peft, target_peft = setup.tensor(x), setup.tensor(target)
    peft_state: dict[str, Any] = {"step": first_step}

    def run_peft() -> None:
        loss = peft_model.base_model(x_peft, target_peft).loss
        loss.backward()
        peft_optimizer.step()
        peft_model.base_model.update_and_allocate(peft_state["step"])
        peft_optimizer.zero_grad()
        peft_state["loss"] = loss.detach()
        peft_state["step"] += 1

    def peft_outputs() -> dict[str, np.ndarray]:
        out = {"loss": np.asarray([float(peft_state["loss"])])}
        for n in targets:
            out.update({f"{n}.{part}": _t2n(getattr(getattr(inner, n), part)["default"]) for part in PARTS})
        return out

    return Workload(name, ours, Side(run_peft, setup.sync_peft, peft_outputs))


@dataclass
class _Output:
    """What the torch MLP returns: peft adds the orthogonal term to an output's `.loss`."""

    loss: Any
