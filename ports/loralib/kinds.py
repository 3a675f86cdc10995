"""The authors' loralib answering golden cases: `RUNNERS[kind](case)` -> {check key: value}.

loralib is QingruZhang/AdaLoRA's `loralib/loralib/adalora.py` (`SVDLinear`, `RankAllocator`,
`compute_orth_regu`) with `utils.py` (`mark_only_lora_as_trainable`, `lora_state_dict`). It is not
part of this repository: driver.py puts the checkout given on its command line on `sys.path` before
importing this module, so `import loralib` below is the authors' code, unchanged.

Each runner calls loralib's own API the way its README and its NLU trainer do, with the case's
inputs, and returns what loralib computed under the case's check keys. Nothing of loralib is
patched: where it computes something else than peft, the outputs show it. The mapping decisions
(step numbering, dropout, merge, the rank pattern, names) are in ports/loralib/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import loralib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adalora_ref.conformance.case import Case

Outputs = dict[str, Any]
PARTS = ("lora_A", "lora_E", "lora_B")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BETA_DEFAULT = 0.85  # peft's default beta1 and beta2 (loralib's RankAllocator has no default)


class InputError(ValueError):
    """A case input that loralib's tensors cannot take (its name and both shapes)."""


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _input(case: Case, name: str) -> torch.Tensor:
    """The case's input `name` as a torch tensor of its stored dtype (a copy)."""
    return torch.from_numpy(np.array(case.inputs[name]))


def _assign(param: torch.Tensor, case: Case, name: str) -> None:
    """Set a loralib parameter's data to the case input `name`, shapes checked."""
    value = _input(case, name)
    if tuple(value.shape) != tuple(param.shape):
        raise InputError(f"input {name!r} has shape {tuple(value.shape)}, loralib's tensor {tuple(param.shape)}")
    param.data = value


class FixedDropout(nn.Module):
    """torch's dropout with the case's draw: x times its scaled mask (each entry 0 or 1 / (1 - p))."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class Net(nn.Module):
    """The layers in order, ReLU between consecutive ones, none after the last (docs/SPEC.md, 7.3)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.children())
        for i, layer in enumerate(layers):
            x = layer(x)
            if i < len(layers) - 1:
                x = torch.relu(x)
        return x


class MaskObserver:
    """What `RankAllocator.mask_to_target_rank` decided, read from its own locals as it returns.

    loralib keeps neither the triplet scores nor the kept rows: `is_dict` (name of E -> scores,
    shape (r, 1)) is a local of mask_to_target_rank (adalora.py:245-281) and its return value is the
    threshold. A profile hook copies both when the function returns; it changes nothing.
    """

    def __init__(self) -> None:
        self.code = loralib.RankAllocator.mask_to_target_rank.__code__
        self.scores: dict[str, torch.Tensor] | None = None
        self.threshold: float | None = None

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is self.code and "is_dict" in frame.f_locals:
            self.scores = {n: s.detach().clone() for n, s in frame.f_locals["is_dict"].items()}
            self.threshold = arg

    @contextmanager
    def watching(self) -> Iterator[MaskObserver]:
        """Observe one call; `scores` is None afterwards when no masking ran."""
        self.scores, self.threshold = None, None
        sys.setprofile(self._profile)
        try:
            yield self
        finally:
            sys.setprofile(None)

    def kept(self) -> dict[str, list[bool]]:
        """The rows the masking kept, per E (`is_dict[n] > mask_threshold`, adalora.py:293)."""
        assert self.scores is not None and self.threshold is not None
        return {n: [bool(v) for v in (s.view(-1) > self.threshold)] for n, s in self.scores.items()}


def _svd_linear(n_in: int, n_out: int, r: int, dtype: torch.dtype, **kwargs: Any) -> loralib.SVDLinear:
    return loralib.SVDLinear(n_in, n_out, r=r, dtype=dtype, **kwargs)


def _lora_layers(net: nn.Module) -> dict[str, loralib.SVDLinear]:
    """The layers that hold a triplet (an SVDLinear built with r > 0 has lora_A, adalora.py:33)."""
    return {n: m for n, m in net.named_children() if isinstance(m, loralib.SVDLinear) and hasattr(m, "lora_A")}


def _allocator(net: nn.Module, c: dict[str, Any], lora_r: int) -> loralib.RankAllocator:
    """loralib's RankAllocator under its own argument names (README quickstart: total_step given)."""
    return loralib.RankAllocator(
        net,
        lora_r=lora_r,
        target_rank=c["target_r"],
        init_warmup=c["tinit"],
        final_warmup=c["tfinal"],
        mask_interval=c["deltaT"],
        beta1=c.get("beta1", BETA_DEFAULT),
        beta2=c.get("beta2", BETA_DEFAULT),
        total_step=c["total_step"],
    )


def _steps(c: dict[str, Any], numbering: str) -> list[tuple[int, int]]:
    """(the case's step number, the global_step passed to update_and_mask) for each step of the case.

    The case numbers its steps from `first_step` (default 1, docs/SPEC.md 16.2). loralib's own
    trainers count from 0: the k-th optimizer step (k = 0, 1, ...) calls
    `update_and_mask(model, self.state.global_step)` before `global_step += 1` (NLU trainer.py:1126-1129,
    run_summarization_no_trainer.py:825-829). numbering "loralib" passes k; "peft" (a diagnostic)
    passes the case's own step number.
    """
    first = c.get("first_step", 1)
    return [(first + k, k if numbering == "loralib" else first + k) for k in range(c["n_steps"])]


def run_layer(case: Case) -> Outputs:
    """One SVDLinear: forward (train mode), backward with grad_y, merge by eval(), unmerge by train()."""
    c, dtype = case.config, DTYPES[case.dtype]
    kwargs = {"lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"], "fan_in_fan_out": c["fan_in_fan_out"]}
    layer = _svd_linear(c["in_features"], c["out_features"], c["r"], dtype, bias=c["bias"], **kwargs)
    _assign(layer.weight, case, "weight")
    if c["bias"]:
        _assign(layer.bias, case, "bias")
    for part in PARTS:
        _assign(getattr(layer, part), case, part)
    if "dropout_mask" in case.inputs:
        layer.lora_dropout = FixedDropout(_input(case, "dropout_mask"))
    x = _input(case, "x").requires_grad_()
    y = layer(x)
    y.backward(_input(case, "grad_y"))
    out: Outputs = {"scaling": layer.scaling, "ranknum": layer.ranknum.item(), "y": _np(y), "grad_x": _np(x.grad)}
    out.update({f"grad_{part}": _np(getattr(layer, part).grad) for part in PARTS})
    # loralib has no delta-weight function: what its merge adds is read off a twin whose weight is 0
    twin = _svd_linear(c["in_features"], c["out_features"], c["r"], dtype, bias=c["bias"], **kwargs)
    twin.weight.data = torch.zeros_like(layer.weight)
    for part in PARTS:
        getattr(twin, part).data = getattr(layer, part).data.clone()
    twin.eval()
    out["delta_weight"] = _np(twin.weight)
    layer.eval()  # SVDLinear.eval merges (adalora.py:76-86)
    out["merged_weight"] = _np(layer.weight)
    layer.train()  # SVDLinear.train unmerges (adalora.py:64-74)
    out["unmerged_weight"] = _np(layer.weight)
    return out


def run_init(case: Case) -> Outputs:
    """A fresh SVDLinear under torch's seed: reset_parameters draws the triplet (adalora.py:55-62)."""
    c = case.config
    torch.manual_seed(c["seed"])
    layer = _svd_linear(c["in_features"], c["out_features"], c["r"], DTYPES[case.dtype])
    out: Outputs = {part: _np(getattr(layer, part)) for part in PARTS}
    for part in PARTS:
        values = out[part].astype(np.float64)
        out[f"std.{part}"], out[f"mean.{part}"] = np.asarray(values.std()), np.asarray(values.mean())
    return out


def run_orth(case: Case) -> Outputs:
    """compute_orth_regu over a model of SVDLinear layers holding the case's A and B, and its gradients."""
    c, dtype = case.config, DTYPES[case.dtype]
    net = Net({name: _svd_linear(n_in, n_out, r, dtype) for name, r, n_in, n_out in c["layers"]})
    layers = _lora_layers(net)
    for name, layer in layers.items():
        _assign(layer.lora_A, case, f"{name}.lora_A")
        _assign(layer.lora_B, case, f"{name}.lora_B")
    value = loralib.compute_orth_regu(net, regu_weight=c["orth_reg_weight"])
    value.backward()
    out: Outputs = {"value": _np(value)}
    for name, layer in layers.items():
        out[f"grad.{name}.lora_A"], out[f"grad.{name}.lora_B"] = _np(layer.lora_A.grad), _np(layer.lora_B.grad)
    return out


def run_schedule(case: Case) -> Outputs:
    """RankAllocator.schedule_threshold(step) for each listed step, on a model of the listed ranks."""
    c = case.config
    net = Net({f"layer{i}": _svd_linear(1, 1, r, torch.float64) for i, r in enumerate(c["layer_ranks"])})
    allocator = _allocator(net, c, lora_r=max(c["layer_ranks"], default=0))  # lora_r is stored, never read
    out: Outputs = {"init_bgt": allocator.total_rank, "target_bgt": allocator.target_rank}
    for step in c["steps"]:
        out[f"step{step}.budget"], out[f"step{step}.mask"] = allocator.schedule_threshold(step)
    return out


def _importance(at: str, allocator: loralib.RankAllocator) -> Outputs:
    """The allocator's ipt, exp_avg_ipt and exp_avg_unc of every lora_ tensor, keyed as the checks."""
    out: Outputs = {}
    for quantity in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for n, value in getattr(allocator, quantity).items():
            out[f"{at}.{quantity}.{n}"] = _np(value)
    return out


def _masking(at: str, observer: MaskObserver, dtype: str) -> Outputs:
    """A masking call's scores per layer and its threshold (a Python float: `.item()`, adalora.py:284)."""
    assert observer.scores is not None
    out: Outputs = {f"{at}.threshold": np.asarray(observer.threshold, dtype=dtype)}
    for n, score in observer.scores.items():
        out[f"{at}.scores.{n.removesuffix('.lora_E')}"] = _np(score.view(-1))
    return out


def run_allocator(case: Case, numbering: str) -> Outputs:
    """update_and_mask(model, global_step) per step with the case's parameters and gradients set."""
    c, dtype = case.config, DTYPES[case.dtype]
    net = Net({name: _svd_linear(n_in, n_out, r, dtype) for name, r, n_in, n_out in c["layers"]})
    layers = _lora_layers(net)
    allocator = _allocator(net, c, lora_r=c["init_r"])
    observer = MaskObserver()
    out: Outputs = {}
    for s, global_step in _steps(c, numbering):
        for name, layer in layers.items():
            for part in PARTS:
                param = getattr(layer, part)
                _assign(param, case, f"step{s}.{name}.{part}")
                param.grad = _input(case, f"step{s}.{name}.{part}.grad")
        with observer.watching():
            budget, threshold = allocator.update_and_mask(net, global_step)
        out.update(_importance(f"step{s}", allocator))
        out[f"step{s}.budget"], out[f"step{s}.masked"] = budget, threshold is not None
        if observer.scores is not None:
            out.update(_masking(f"step{s}", observer, case.dtype))
            for n, kept in observer.kept().items():
                out[f"step{s}.rank_pattern.{n.removesuffix('.lora_E')}"] = kept
        for name, layer in layers.items():
            out[f"step{s}.lora_E.{name}"] = _np(layer.lora_E)
    return out


def _trajectory_net(case: Case) -> Net:
    """The case's network: SVDLinear where targeted (rank init_r), a frozen nn.Linear elsewhere."""
    c, a, dtype = case.config, case.config["adalora"], DTYPES[case.dtype]
    fan_in_fan_out = a.get("fan_in_fan_out", False)  # then every layer is a Conv1D, weight (in, out)
    layers: dict[str, nn.Module] = {}
    for name, n_in, n_out, targeted in c["layers"]:
        if targeted:
            layer = _svd_linear(
                n_in,
                n_out,
                a["init_r"],
                dtype,
                lora_alpha=a["lora_alpha"],
                lora_dropout=a.get("lora_dropout", 0.0),
                fan_in_fan_out=fan_in_fan_out,
                bias=f"base.{name}.bias" in case.inputs,
            )
            _assign(layer.weight, case, f"base.{name}.weight")
            for part in PARTS:
                _assign(getattr(layer, part), case, f"init.{name}.{part}")
        else:
            layer = nn.Linear(n_in, n_out, bias=f"base.{name}.bias" in case.inputs, dtype=dtype)
            weight = _input(case, f"base.{name}.weight")
            layer.weight.data = weight.T.contiguous() if fan_in_fan_out else weight
        if layer.bias is not None:
            _assign(layer.bias, case, f"base.{name}.bias")
        layers[name] = layer
    return Net(layers)


def _peft_name(name: str, adapted: set[str], saved_modules: set[str]) -> str:
    """peft's name of a trained base parameter of ours (docs/SPEC.md 2.8): `fc1.bias` of an adapted
    layer is `fc1.base_layer.bias`, `head.weight` of a module to save `head.modules_to_save.default.weight`."""
    module, _, leaf = name.rpartition(".")
    if module in adapted:
        return f"{module}.base_layer.{leaf}"
    if module in saved_modules:
        return f"{module}.modules_to_save.default.{leaf}"
    return name


def run_trajectory(case: Case, numbering: str) -> Outputs:
    """Training in the order of loralib's README and NLU trainer (trainer.py:1076-1129): forward,
    loss + compute_orth_regu, backward, optimizer.step(), update_and_mask(model, global_step), zero_grad."""
    c, a = case.config, case.config["adalora"]
    net = _trajectory_net(case)
    layers = _lora_layers(net)
    bias = a.get("bias", "none")
    loralib.mark_only_lora_as_trainable(net, bias=bias)
    saved_modules = set(a.get("modules_to_save") or [])
    for name in saved_modules:  # run_glue.py:500-501: the modules outside the backbone train whole
        net.get_submodule(name).requires_grad_(True)
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    base_names = {n: _peft_name(n, set(layers), saved_modules) for n in trained if "lora_" not in n}
    adamw = {k: tuple(v) if k == "betas" else v for k, v in c.get("adamw", {}).items()}
    optimizer = torch.optim.AdamW(list(trained.values()), lr=c["lr"], **adamw)
    allocator = _allocator(net, a, lora_r=a["init_r"])
    loss_fn: Callable[..., torch.Tensor] = F.mse_loss if c["loss"] == "mse" else F.cross_entropy
    record_after = set(c.get("after_optimizer_steps", []))
    observer, kept = MaskObserver(), None
    out: Outputs = {}
    net.train()
    for s, global_step in _steps(c, numbering):
        for name, layer in layers.items():
            if (key := f"step{s}.dropout_mask.{name}") in case.inputs:
                layer.lora_dropout = FixedDropout(_input(case, key))
        task_loss = loss_fn(net(_input(case, f"step{s}.x")), _input(case, f"step{s}.target"))
        orth_loss = loralib.compute_orth_regu(net, regu_weight=a.get("orth_reg_weight", 0.5))
        loss = task_loss + orth_loss
        loss.backward()
        optimizer.step()
        if s in record_after:
            out.update({f"step{s}.after_optimizer.{n}": _np(p) for n, p in trained.items() if "lora_" in n})
            out.update({f"step{s}.after_optimizer.{peft}": _np(trained[n]) for n, peft in base_names.items()})
        with observer.watching():
            budget, _ = allocator.update_and_mask(net, global_step)
        net.zero_grad()
        out[f"step{s}.task_loss"], out[f"step{s}.orth_loss"] = _np(task_loss), _np(orth_loss)
        out[f"step{s}.loss"], out[f"step{s}.budget"] = _np(loss), budget
        out.update(_importance(f"step{s}", allocator))
        if observer.scores is not None:
            out.update(_masking(f"step{s}", observer, case.dtype))
            kept = observer.kept()
        out[f"step{s}.rank_pattern"] = kept
        for name, layer in layers.items():
            out[f"step{s}.E_nonzero.{name}"] = [bool(v) for v in (layer.lora_E.detach().view(-1) != 0)]
            out[f"step{s}.ranknum.{name}"] = layer.ranknum.item()
    out.update({f"final.{n}": _np(p) for n, p in net.named_parameters() if any(part in n for part in PARTS)})
    out.update({f"final_base.{peft}": _np(trained[n]) for n, peft in base_names.items()})
    for n, value in loralib.lora_state_dict(net, bias=bias).items():  # its checkpoint: nothing cut
        name = n if "lora_" in n else _peft_name(n, set(layers), set())
        out[f"saved.base_model.model.{name}"] = _np(value)
    return out


def run_case(case: Case, numbering: str = "loralib") -> Outputs:
    """loralib's outputs for `case`; `numbering` says which global_step the stepped kinds pass (_steps)."""
    if case.kind == "allocator":
        return run_allocator(case, numbering)
    if case.kind == "trajectory":
        return run_trajectory(case, numbering)
    runners: dict[str, Callable[[Case], Outputs]] = {
        "layer": run_layer,
        "init": run_init,
        "orth": run_orth,
        "schedule": run_schedule,
    }
    if case.kind not in runners:
        raise ValueError(f"case {case.id}: no loralib runner for kind {case.kind!r} (declare it in port.json)")
    return runners[case.kind](case)
