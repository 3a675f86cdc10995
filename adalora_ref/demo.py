"""The planted-rank demo (`adalora-ref demo`): AdaLoRA finds the layers that need rank.

The task. A frozen random MLP of five 32 x 32 linear layers (ReLU between them) is the base
model. The teacher is the same MLP with a known low-rank update planted in every layer:

    W_k + D_k,    D_k = U_k diag(sigma_k) V_k^T,    rank(D_k) = planted[k]   (default 0, 1, 2, 4, 8)

The student is an AdaLoraModel on the same frozen base weights, every layer starting at the same
init_r = 12, with the total target budget equal to the planted total rank (peft's budget is
target_r * number of adapted layers, so target_r = sum(planted) / layers = 3: the planted ranks
must sum to a multiple of the number of layers). It learns from (x, teacher(x)) pairs. To reach
zero loss it must spend rank 8 on the last layer and none on the first; to do it under the
budget it must find that out itself. At the end the allocated ranks are printed next to the
planted ones.

What makes the recovery clear-cut. Measured with the defaults: 58 of 60 seeds give exactly the
planted ranks (296 of 300 layers, mean |error| 0.02); in the two misses the last layer loses one or
two ranks to another layer (--steps 5000: 59 of 60). The design choices:
- The student can represent the teacher exactly with the planted ranks, and the ReLUs keep one
  layer from copying another layer's update exactly (a linear teacher would let any layer hold it).
- Every planted direction matters equally: sigma_i is set so that direction i moves its layer's
  output by STRENGTH times the RMS of a base output unit, on the teacher's own activations. With
  one sigma for all, the directions' effects differ tenfold (ReLU outputs are non-negative, so a
  direction v_i along their mean sees a far larger input than one orthogonal to it), and the
  allocator rightly prefers a direction elsewhere that compensates to a nearly invisible one.
- He-scaled base weights keep activations, gradients and so the importance scores of different
  layers on one scale: the budget is global, so scores are compared across layers.
- orth_reg_weight = 0 (peft's default is 0.5). peft's orthogonal term is a Frobenius norm, not
  squared: its gradient keeps a constant size however close A and B are to orthonormal, and it
  enters the importance of every triplet alike. In a noiseless task whose task gradients shrink as
  the fit gets good, that floor drowns the differences this demo shows: with 0.5, 1 seed in 10 is
  exact (mean |error| 0.96) and the loss stays near plain LoRA's. `--orth-reg-weight 0.5` shows it.
- Enough steps (3000 at batch 256), the learning rate decayed linearly to 0 (transformers'
  default schedule), a warm-up of steps/5 before any pruning and a final phase of steps/5.

The comparison: plain LoRA, i.e. a fixed rank target_r = 3 in every layer, the same number of
trainable parameters as AdaLoRA's adapters have at the end (after resizing to the kept rows; all
layers have one shape, so both hold 15 rank-1 triplets). It is the same SVD adapter with
init_r = target_r: the budget never shrinks and nothing is pruned (the reference's k = 0 rule), so
the only difference from the AdaLoRA run is where the rank goes.

Owns: the teacher, the two training loops and what they record, the report table, the figures
(`--plot DIR`, needs matplotlib: the `plot` extra) and the `demo` subcommand. Does not own any
AdaLoRA math: it drives model.py and training.py as a user would.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ._backend import BACKENDS, dtype_by_name, from_numpy, get_backend, to_numpy
from ._files import write_atomically
from .cli_args import load_backend, non_negative_float, non_negative_int, usable_directory, write_output
from .config import AdaLoraConfig
from .mlp import MLP, mse_loss
from .model import AdaLoraModel, BaseLinear
from .optim import AdamW
from .training import train_step

WIDTH = 32  # every layer is WIDTH x WIDTH
DEFAULT_PLANTED = (0, 1, 2, 4, 8)
DEFAULT_INIT_R = 12
DEFAULT_STEPS = 3000
MIN_STEPS = 100  # warm-up, budgeting and final phase each need room (steps/5, 3 steps/5, steps/5)
BATCH = 256
LR = 2e-2
DELTA_T = 10
STRENGTH = 0.7  # each planted direction moves its layer's output by 0.7 x the RMS of a base output unit
CALIBRATION_SIZE = 2048
EVAL_SIZE = 4096
PLOT_HINT = 'the --plot figures need matplotlib: pip install "adalora-ref[plot]"'

# Independent random streams, so that AdaLoRA and LoRA see the same teacher, init and batches.
TEACHER_STREAM, INIT_STREAM, DATA_STREAM, EVAL_STREAM = range(4)


# -- the teacher --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """The frozen base MLP and the low-rank updates planted in it (NumPy: it only makes data)."""

    weights: dict[str, np.ndarray]  # layer -> base weight (out, in), shared with the student
    deltas: dict[str, np.ndarray]  # layer -> planted update D (out, in), rank planted[layer]
    planted: dict[str, int]

    def __call__(self, x: np.ndarray, *, with_updates: bool = True) -> np.ndarray:
        """The teacher's output (n, WIDTH) for inputs x (n, WIDTH); with_updates=False: the base model's."""
        h = x
        for k, (name, W) in enumerate(self.weights.items()):
            W_k = W + self.deltas[name] if with_updates else W  # (out, in)
            h = h @ W_k.T  # (n, out)
            if k < len(self.weights) - 1:
                h = np.maximum(h, 0.0)  # ReLU, as mlp.MLP
        return h


def make_teacher(planted: Sequence[int], rng: np.random.Generator) -> Teacher:
    """Random He-scaled base weights and, in layer k, a rank planted[k] update of calibrated strength.

    Layer by layer on a calibration batch h (the teacher's own inputs to that layer):
    sigma_i = STRENGTH * rms(h @ W.T) / rms(h @ v_i), so each direction u_i sigma_i v_i^T adds
    to the layer's output a vector of RMS length STRENGTH * (RMS of one base output unit).
    """
    weights, deltas = {}, {}
    h = rng.normal(size=(CALIBRATION_SIZE, WIDTH))  # (n, in)
    for k, r in enumerate(planted):
        name = f"fc{k + 1}"
        W = rng.normal(size=(WIDTH, WIDTH)) * math.sqrt(2.0 / WIDTH)  # (out, in), He scale for ReLU
        U, _ = np.linalg.qr(rng.normal(size=(WIDTH, r)))  # (out, r) orthonormal columns
        V, _ = np.linalg.qr(rng.normal(size=(WIDTH, r)))  # (in, r)
        unit_rms = np.sqrt(np.mean((h @ W.T) ** 2))
        sigma = STRENGTH * unit_rms / np.sqrt(np.mean((h @ V) ** 2, axis=0))  # (r,)
        weights[name], deltas[name] = W, (U * sigma) @ V.T  # (out, in)
        h = h @ (W + deltas[name]).T  # (n, out)
        if k < len(planted) - 1:
            h = np.maximum(h, 0.0)
    return Teacher(weights, deltas, {name: int(r) for name, r in zip(weights, planted, strict=True)})


# -- training a student -------------------------------------------------------------------------


@dataclass
class History:
    """What one training run recorded, step by step, for the table and the figures."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # task loss (MSE) of the step's batch
    budget: list[int] = field(default_factory=list)  # the schedule's total rank budget
    ranks: dict[str, list[int]] = field(default_factory=dict)  # layer -> rank after the step
    tinit: int = 0
    final_step: int = 0  # total_step - tfinal: the final masking
    target_budget: int = 0
    final_scores: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (init_r,) at the final masking
    final_keep: dict[str, list[bool]] = field(default_factory=dict)


@dataclass
class StudentRun:
    label: str
    ranks: dict[str, int]  # layer -> rank kept at the end
    eval_loss: float  # MSE against the teacher on a held-out batch
    trainable_params: int  # A, E and B entries after resizing to the kept rows
    history: History


def train_student(
    teacher: Teacher,
    *,
    init_r: int,
    target_r: int,
    steps: int,
    seed: int,
    backend: str = "numpy",
    orth_reg_weight: float = 0.0,
    label: str = "AdaLoRA",
    progress: bool = True,
) -> StudentRun:
    """Train an AdaLoRA student on (x, teacher(x)) in peft's call order; init_r == target_r is plain LoRA."""
    xp = get_backend(backend)
    dtype = dtype_by_name(xp, "float64")
    names = list(teacher.weights)
    zeros = np.zeros(WIDTH)
    layers = {
        n: BaseLinear(from_numpy(xp, teacher.weights[n], dtype=dtype), from_numpy(xp, zeros, dtype=dtype))
        for n in names
    }
    tinit = tfinal = steps // 5
    config = AdaLoraConfig(
        target_modules=names,
        init_r=init_r,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=DELTA_T,
        total_step=steps,
        orth_reg_weight=orth_reg_weight,
    )
    model = AdaLoraModel(layers, config, np.random.default_rng([seed, INIT_STREAM]))
    net = MLP(model)
    assert model.allocator is not None
    history = History(
        ranks={n: [] for n in names},
        tinit=tinit,
        final_step=steps - tfinal,
        target_budget=model.allocator.target_bgt,
    )
    optimizer = AdamW(lr=LR)
    data = np.random.default_rng([seed, DATA_STREAM])
    bar = tqdm(range(1, steps + 1), desc=label, unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        optimizer.lr = LR * (1 - (step - 1) / steps)  # linear decay to 0
        x = data.normal(size=(BATCH, WIDTH))  # (batch, in)
        x_b, y_b = from_numpy(xp, x, dtype=dtype), from_numpy(xp, teacher(x), dtype=dtype)
        result = train_step(net, optimizer, x_b, y_b, step, mse_loss)
        allocation = result.allocation
        budget = history.target_budget if allocation is None else allocation.budget  # None: the final phase
        if allocation is not None and step == history.final_step:
            history.final_scores = {n: to_numpy(s) for n, s in allocation.scores.items()}
            history.final_keep = dict(allocation.rank_pattern or {})
        pattern = model.layer_rank_pattern()
        history.steps.append(step)
        history.loss.append(result.loss - result.orth_reg)
        history.budget.append(budget)
        for n in names:
            history.ranks[n].append(sum(pattern[n]) if n in pattern else init_r)
        if step % 10 == 0 or step == steps:
            bar.set_postfix(loss=f"{history.loss[-1]:.2e}", budget=budget, refresh=False)
    bar.close()
    ranks = {n: history.ranks[n][-1] for n in names}
    model.resize_by_rank_pattern()  # drop the pruned rows: what a saved adapter holds
    params = sum(
        math.prod(getattr(t, p).shape) for t in model.triplets().values() for p in ("lora_A", "lora_E", "lora_B")
    )
    x_eval = np.random.default_rng([seed, EVAL_STREAM]).normal(size=(EVAL_SIZE, WIDTH))
    y, _ = net.forward(from_numpy(xp, x_eval, dtype=dtype))
    eval_loss = float(mse_loss(y, from_numpy(xp, teacher(x_eval), dtype=dtype))[0])
    return StudentRun(label, ranks, eval_loss, params, history)


# -- the demo -----------------------------------------------------------------------------------


@dataclass
class DemoResult:
    planted: dict[str, int]
    adalora: StudentRun
    lora: StudentRun | None
    base_loss: float  # the frozen base model's MSE against the teacher

    def exact_layers(self) -> int:
        """How many layers got exactly their planted rank."""
        return sum(self.adalora.ranks[n] == r for n, r in self.planted.items())

    def mean_abs_error(self) -> float:
        """Mean over layers of |allocated rank - planted rank|."""
        return float(np.mean([abs(self.adalora.ranks[n] - r) for n, r in self.planted.items()]))


def check_options(planted: Sequence[int], init_r: int, steps: int) -> None:
    """Raise ValueError, naming the option and the value, for a demo that cannot be run as asked."""
    text = ",".join(str(r) for r in planted)
    if not 1 <= init_r <= WIDTH:
        raise ValueError(f"--init-r must be between 1 and the layer width {WIDTH}, got {init_r}")
    if steps < MIN_STEPS:
        raise ValueError(f"--steps must be at least {MIN_STEPS} (warm-up, budgeting and final phase), got {steps}")
    if not planted:
        raise ValueError("--planted needs at least one rank (one per layer), got an empty list")
    for k, r in enumerate(planted):
        where = f"--planted {text}: layer fc{k + 1} has rank {r}"
        if r < 0:
            raise ValueError(f"{where}, a rank must be >= 0")
        if r > WIDTH:
            raise ValueError(f"{where}, more than the layer width {WIDTH}")
        if r > init_r:
            raise ValueError(f"{where}, more than --init-r {init_r}: a layer cannot keep more than it starts with")
    if sum(planted) % len(planted):
        raise ValueError(
            f"--planted {text}: the ranks sum to {sum(planted)}, not a multiple of the {len(planted)} layers "
            f"(peft's target budget is target_r * layers, and it must equal the planted total)"
        )


def run_demo(
    planted: Sequence[int] = DEFAULT_PLANTED,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    init_r: int = DEFAULT_INIT_R,
    backend: str = "numpy",
    orth_reg_weight: float = 0.0,
    compare_lora: bool = True,
    progress: bool = True,
) -> DemoResult:
    """Plant the ranks, train AdaLoRA (and plain LoRA at rank target_r) on the teacher, return both."""
    check_options(planted, init_r, steps)
    target_r = sum(planted) // len(planted)
    teacher = make_teacher(planted, np.random.default_rng([seed, TEACHER_STREAM]))
    common: dict[str, Any] = dict(
        target_r=target_r, steps=steps, seed=seed, backend=backend, orth_reg_weight=orth_reg_weight, progress=progress
    )
    adalora = train_student(teacher, init_r=init_r, label=f"AdaLoRA {init_r} -> {target_r}", **common)
    lora = train_student(teacher, init_r=target_r, label=f"LoRA r={target_r}", **common) if compare_lora else None
    x = np.random.default_rng([seed, EVAL_STREAM]).normal(size=(EVAL_SIZE, WIDTH))
    base_loss = float(np.mean((teacher(x, with_updates=False) - teacher(x)) ** 2))
    return DemoResult(teacher.planted, adalora, lora, base_loss)


def format_report(result: DemoResult) -> str:
    """The table of planted vs allocated ranks, and the held-out losses."""
    lora = result.lora
    header = f"{'layer':8s}{'planted rank':>14s}{'AdaLoRA rank':>14s}" + (f"{'LoRA rank':>11s}" if lora else "")
    lines = [header, "-" * len(header)]
    for name, r in result.planted.items():
        row = f"{name:8s}{r:14d}{result.adalora.ranks[name]:14d}"
        lines.append(row + (f"{lora.ranks[name]:11d}" if lora else ""))
    total = f"{'total':8s}{sum(result.planted.values()):14d}{sum(result.adalora.ranks.values()):14d}"
    lines += ["-" * len(header), total + (f"{sum(lora.ranks.values()):11d}" if lora else ""), ""]
    n = len(result.planted)
    lines.append(
        f"allocated = planted in {result.exact_layers()} of {n} layers (mean |error| {result.mean_abs_error():.2f})"
    )
    lines.append(f"held-out MSE against the teacher: frozen base {result.base_loss:.3e}")
    ada = result.adalora
    width = max(len("AdaLoRA"), len(lora.label) if lora else 0) + 2  # a label of any length keeps a gap
    lines.append(
        f"  {'AdaLoRA':{width}s}{ada.eval_loss:.3e}   ({ada.trainable_params} trainable parameters at the end)"
    )
    if lora:
        lines.append(f"  {lora.label:{width}s}{lora.eval_loss:.3e}   ({lora.trainable_params} trainable parameters)")
    return "\n".join(lines)


# -- figures ------------------------------------------------------------------------------------


def _matplotlib() -> Any:
    """matplotlib's Figure class with the Agg canvas, or ImportError telling how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(PLOT_HINT) from err
    return Figure, FigureCanvasAgg


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib is missing (checked before training)."""
    _matplotlib()


def _phases(ax: Any, history: History, *, labelled: bool = True) -> None:
    """Shade AdaLoRA's three phases: warm-up (step <= tinit), budgeting, final (step > total_step - tfinal)."""
    spans = (
        (0, history.tinit, "tab:green", "warm-up (no pruning)"),
        (history.tinit, history.final_step, "tab:orange", "budget shrinks"),
        (history.final_step, history.steps[-1], "tab:blue", "final phase (ranks fixed)"),
    )
    for start, end, color, label in spans:
        ax.axvspan(start, end, color=color, alpha=0.08, label=label if labelled else None)
    ax.set_xlim(0, history.steps[-1])


def _budget_figure(Figure: Any, result: DemoResult) -> Any:
    h = result.adalora.history
    fig = Figure(figsize=(8.5, 6.0), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _phases(top, h)
    kept = [sum(h.ranks[n][i] for n in h.ranks) for i in range(len(h.steps))]
    top.plot(h.steps, h.budget, color="black", label="budget (cubic schedule)")
    top.step(h.steps, kept, where="post", color="tab:red", linestyle="--", label="singular values kept")
    top.axhline(h.target_budget, color="gray", linestyle=":", label=f"target budget {h.target_budget}")
    top.set_ylabel("total rank over all layers")
    top.set_title("AdaLoRA's total rank budget over training, and the training loss")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    _phases(bottom, h, labelled=False)
    bottom.semilogy(h.steps, h.loss, color="tab:purple", linewidth=0.8, label=result.adalora.label)
    if result.lora is not None:
        lora = result.lora.history
        bottom.semilogy(lora.steps, lora.loss, color="tab:gray", linewidth=0.8, label=result.lora.label)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("training loss (MSE)")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _ranks_figure(Figure: Any, result: DemoResult) -> Any:
    h = result.adalora.history
    fig = Figure(figsize=(8.5, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    _phases(ax, h)
    for k, (name, planted) in enumerate(result.planted.items()):
        color = f"C{k}"
        ax.step(h.steps, h.ranks[name], where="post", color=color, label=f"{name} (planted {planted})")
        ax.axhline(planted, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("rank (singular values kept)")
    ax.set_title("Each layer's rank over training (dotted: its planted rank)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _importance_figure(Figure: Any, result: DemoResult) -> Any:
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    h = result.adalora.history
    names = list(result.planted)
    scores = np.stack([np.sort(h.final_scores[n])[::-1] for n in names])  # (layers, init_r), best first
    positive = scores[scores > 0]
    floor = positive.min() if positive.size else 1.0
    fig = Figure(figsize=(7.5, 0.55 * len(names) + 2.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.maximum(scores, floor), aspect="auto", cmap="viridis", norm=LogNorm())
    for row, name in enumerate(names):
        for col in range(sum(h.final_keep[name])):  # the kept triplets are the best-scored ones
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.5))
    ax.set_yticks(range(len(names)), [f"{n} (planted {result.planted[n]})" for n in names])
    ax.set_xticks(range(scores.shape[1]), [str(i + 1) for i in range(scores.shape[1])])
    ax.set_xlabel("triplet of the layer, sorted by score (1 = most important)")
    ax.set_title(f"Triplet importance scores at the final masking, step {h.final_step} (outlined: kept)")
    fig.colorbar(image, ax=ax, label="importance score (log scale)")
    return fig


def write_plots(
    result: DemoResult, directory: str | Path, *, write: Callable[[Path, bytes], None] = write_atomically
) -> list[Path]:
    """Write budget.png, ranks.png and importance.png into `directory`; each file appears whole or not at all.

    `write(path, data)` writes one file (the command passes one that turns an OSError into its error line).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    directory = Path(directory)
    written = []
    for filename, make in (
        ("budget.png", _budget_figure),
        ("ranks.png", _ranks_figure),
        ("importance.png", _importance_figure),
    ):
        fig = make(Figure, result)
        buffer = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buffer)
        path = directory / filename
        write(path, buffer.getvalue())
        written.append(path)
    return written


# -- the command --------------------------------------------------------------------------------


def _rank_list(text: str) -> tuple[int, ...]:
    """argparse type of --planted: comma-separated integers (the range checks come after parsing)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer ranks such as 0,1,2,4,8, got {text!r}"
        ) from None


def register_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="watch AdaLoRA move rank to the layers where a teacher's low-rank updates were planted",
        description=__doc__.split("\n\n")[0],
    )
    demo.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the teacher, the init and the data, >= 0 (default: %(default)s)",
    )
    demo.add_argument(
        "--planted",
        type=_rank_list,
        default=DEFAULT_PLANTED,
        help="planted rank of each layer, comma-separated; one layer per rank (default: 0,1,2,4,8)",
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"training steps, at least {MIN_STEPS} (default: %(default)s)",
    )
    demo.add_argument(
        "--init-r",
        type=int,
        default=DEFAULT_INIT_R,
        help=f"every layer's starting rank, 1 to {WIDTH} (default: %(default)s)",
    )
    demo.add_argument(
        "--backend", choices=BACKENDS, default="numpy", help="array library the students run on (default: %(default)s)"
    )
    demo.add_argument(
        "--orth-reg-weight",
        type=non_negative_float,
        default=0.0,
        help="weight of peft's orthogonal term; peft's 0.5 blurs the importance in this task (default: %(default)s)",
    )
    demo.add_argument(
        "--plot",
        metavar="DIR",
        type=usable_directory,
        help="write budget.png, ranks.png, importance.png into DIR, created if missing (default: no figures)",
    )
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: a bar per training run on stderr)"
    )

    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        try:
            check_options(args.planted, args.init_r, args.steps)
        except ValueError as err:
            demo.error(str(err))
        load_backend(demo, args.backend)
        if args.plot is not None:
            try:
                require_matplotlib()
            except ImportError as err:
                demo.error(str(err))
        n, target_r = len(args.planted), sum(args.planted) // len(args.planted)
        print(
            f"planted-rank demo: {n} layers of {WIDTH} x {WIDTH}, planted ranks {list(args.planted)}, "
            f"AdaLoRA init_r {args.init_r} -> target_r {target_r} (budget {target_r * n}), {args.steps} steps"
        )
        result = run_demo(
            args.planted,
            seed=args.seed,
            steps=args.steps,
            init_r=args.init_r,
            backend=args.backend,
            orth_reg_weight=args.orth_reg_weight,
            progress=not args.no_progress,
        )
        print(format_report(result))
        if args.plot is not None:
            for path in write_plots(result, args.plot, write=functools.partial(write_output, demo, "--plot")):
                print(f"wrote {path}")
        return 0

    demo.set_defaults(func=run)
