"""The `adalora-ref` command.

    adalora-ref conform [--cases DIR] [--port DIR] [--json FILE]
    adalora-ref train [--steps N] [--seed S] [--backend numpy|array_api_strict|torch|cupy] [--dtype ...]
    adalora-ref bench [--backend ...] [--sizes paper|small] [--only ...] [--json FILE]
    adalora-ref demo [--seed S] [--planted 0,1,2,4,8] [--steps N] [--plot DIR]

`conform` checks the reference (or a port's outputs) against the golden files from peft. `train`
runs AdaLoRA on a small regression MLP for N steps in peft's call order and prints the budget at
every masking step and the final rank pattern. `bench` times the reference and peft side by side
(adalora_ref/bench.py). `demo` plants low-rank updates of known ranks in a teacher and shows
AdaLoRA moving rank to them (adalora_ref/demo.py). Nothing imports this module; it imports the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from ._backend import BACKENDS, dtype_by_name, from_numpy, get_backend
from .bench_report import register_bench
from .cli_args import int_at_least, load_backend, non_negative_int
from .config import AdaLoraConfig
from .conformance.export import register_cases
from .conformance.runner import register_conform
from .demo import register_demo
from .mlp import MLP, mse_loss
from .model import AdaLoraModel, BaseLinear
from .optim import AdamW
from .training import train_step

MIN_TRAIN_STEPS = 10


def run_train(steps: int, seed: int, backend: str, dtype_name: str, fused: bool = False) -> int:
    xp = get_backend(backend)
    dtype = dtype_by_name(xp, dtype_name)
    rng = np.random.default_rng(seed)
    shapes = [("fc1", 16, 64), ("fc2", 64, 64), ("fc3", 64, 64), ("head", 64, 8)]
    layers = {
        name: BaseLinear(
            from_numpy(xp, rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), dtype=dtype),
            from_numpy(xp, np.zeros(n_out), dtype=dtype),
        )
        for name, n_in, n_out in shapes
    }
    tinit, tfinal = steps // 10, steps // 5
    config = AdaLoraConfig(
        target_modules=["fc1", "fc2", "fc3"],
        init_r=8,
        target_r=3,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, steps // 50),
        total_step=steps,
    )
    net = MLP(AdaLoraModel(layers, config, rng, fused=fused))
    optimizer = AdamW(lr=1e-2)
    teacher = rng.normal(size=(16, 8)) / 4.0
    path = "the fused allocator step" if fused else "the readable allocator"
    print(f"AdaLoRA on a {backend} {dtype_name} MLP: init_r 8 -> target_r 3 over {steps} steps, {path}")
    for step in range(1, steps + 1):
        x = rng.normal(size=(64, 16))
        target = np.tanh(x @ teacher)
        result = train_step(
            net, optimizer, from_numpy(xp, x, dtype=dtype), from_numpy(xp, target, dtype=dtype), step, mse_loss
        )
        allocation = result.allocation
        if allocation is not None and allocation.masked and (step % max(1, steps // 10) == 0 or step == steps - tfinal):
            ranks = {name: sum(keep) for name, keep in (allocation.rank_pattern or {}).items()}
            print(f"step {step:5d}  loss {result.loss:.5f}  budget {allocation.budget:3d}  ranks {ranks}")
    print("final rank pattern (adapter_config.json's rank_pattern):")
    for key, keep in (config.rank_pattern or {}).items():
        print(f"  {key:12s} {''.join('1' if k else '0' for k in keep)}  rank {sum(keep)}")
    return 0


def register_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a small MLP with AdaLoRA and print the rank pattern",
        description="Train AdaLoRA on a small regression MLP (layers fc1, fc2, fc3 adapted, init_r 8 -> "
        "target_r 3) in peft's call order; print the budget at the masking steps and the final rank pattern.",
    )
    train.add_argument(
        "--steps",
        type=int_at_least(MIN_TRAIN_STEPS),
        default=200,
        help=f"training steps, at least {MIN_TRAIN_STEPS}; tinit = steps/10, tfinal = steps/5 (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the base weights, the adapters' init and the data, >= 0 (default: %(default)s)",
    )
    train.add_argument(
        "--backend", choices=BACKENDS, default="numpy", help="array library the model runs on (default: %(default)s)"
    )
    train.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float64",
        help="floating dtype of every array (default: %(default)s)",
    )
    train.add_argument(
        "--fused",
        action="store_true",
        help="use the fused allocator step (adalora_ref.fused; NumPy only, needs the 'fast' extra: numba) "
        "(default: the readable allocator)",
    )

    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        load_backend(train, args.backend)
        if args.fused:
            if args.backend != "numpy":
                train.error(f"--fused runs on NumPy arrays only, not --backend {args.backend}")
            try:
                import numba  # noqa: F401
            except ImportError:
                train.error("--fused needs numba: pip install 'adalora-ref[fast]'")
        return run_train(args.steps, args.seed, args.backend, args.dtype, args.fused)

    train.set_defaults(func=run)


# Each command registers its own subparser and sets `func(args, parser) -> exit code`.
COMMANDS = [register_conform, register_cases, register_train, register_bench, register_demo]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adalora-ref", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except BrokenPipeError:  # `adalora-ref cases list | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        return 1


if __name__ == "__main__":
    sys.exit(main())
