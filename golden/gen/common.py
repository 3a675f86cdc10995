"""What every kind's generator shares: the provenance, a case under construction and its checks,
peft driven quietly, tensors out of torch, and `Stack`, the small network the cases adapt.

Every expected output comes out of peft or torch; a generator only chooses inputs, drives peft and
records what it computes, in the order a port should be judged.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import peft
import torch
from transformers.pytorch_utils import Conv1D

from adalora_ref.conformance.case import Case, Check

Generated = Iterator[tuple[Case, dict[str, bytes]]]  # a case and its extra files (a checkpoint's adapter)
PARTS = ("lora_A", "lora_E", "lora_B")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROVENANCE = {
    "peft": peft.__version__,
    "torch": torch.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "generator": "golden/generate.py",
}


def t2n(t: torch.Tensor, dtype: str | None = None) -> np.ndarray:
    array = t.detach().cpu().numpy().copy()
    return array.astype(dtype) if dtype else array


def lora(module: torch.nn.Module, part: str) -> torch.nn.Parameter:
    return getattr(module, part)["default"]


def tensor(key: str, quantity: str, *, step: int | None = None, layer: str | None = None, rtol=None) -> Check:
    return Check(key, quantity, "tensor", step, layer, rtol)


def exact(key: str, quantity: str, *, step: int | None = None, layer: str | None = None) -> Check:
    return Check(key, quantity, "exact", step, layer)


class Stack(torch.nn.Module):
    """Named base layers; `forward` runs them in order with ReLU between and returns `.loss`.

    A layer named in `convs` is a torch.nn.Conv2d built from its entry (in_channels, out_channels,
    kernel_size, stride, padding, dilation); a 4-D activation is flattened (torch.flatten(x, 1))
    before a linear layer.
    """

    def __init__(
        self,
        layers: list[tuple[str, int, int]],
        *,
        conv1d: bool = False,
        bias: bool = True,
        convs: dict[str, dict] | None = None,
    ) -> None:
        super().__init__()
        self.order = [name for name, _, _ in layers]
        convs = convs or {}
        self.conv_names = set(convs)
        for name, n_in, n_out in layers:
            if name in convs:
                layer = torch.nn.Conv2d(**convs[name], bias=bias)
            else:
                layer = Conv1D(n_out, n_in) if conv1d else torch.nn.Linear(n_in, n_out, bias=bias)
            self.add_module(name, layer)
        self.loss_name = "mse"

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        for i, name in enumerate(self.order):
            if x.dim() == 4 and name not in self.conv_names:
                x = torch.flatten(x, 1)
            x = getattr(self, name)(x)
            if i < len(self.order) - 1:
                x = torch.relu(x)
        if target is None:
            loss = (x * 0.0).sum()
        elif self.loss_name == "mse":
            loss = torch.nn.functional.mse_loss(x, target)
        else:
            loss = torch.nn.functional.cross_entropy(x, target)
        self.task_loss = loss.detach().clone()  # peft's AdaLoraModel.forward adds R to `loss` in place
        return SimpleNamespace(loss=loss, logits=x)


# peft writes the base model's module into adapter_config.json ("auto_mapping": {"parent_library"});
# the committed checkpoints say "__main__", where Stack was defined when they were generated.
Stack.__module__ = "__main__"


def adalora(stack: torch.nn.Module, **config: Any) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(stack, peft.AdaLoraConfig(**config))


def case(kind: str, name: str, dtype: str, description: str, config: dict, seed: int) -> Case:
    return Case(
        id=f"{kind}/{name}",
        kind=kind,
        dtype=dtype,
        description=description,
        config=config,
        inputs={},
        checks=[],
        expected={},
        provenance={**PROVENANCE, "seed": seed},
    )


def record(c: Case, check: Check, value: Any) -> None:
    c.checks.append(check)
    c.expected[check.key] = value
