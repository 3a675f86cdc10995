"""checkpoint: an adapter peft trained and saved (cut to its rank pattern), and peft's outputs after
loading it into a fresh base network (docs/SPEC.md 14.8). The case carries peft's two files."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import peft
import torch

from adalora_ref.conformance.case import Case

from .common import PARTS, Generated, Stack, adalora, case, exact, lora, record, t2n, tensor


def cases() -> Generated:
    yield gen_checkpoint("trained_and_saved", 600, 3, None)
    yield gen_checkpoint("one_layer_fully_pruned", 601, 2, "fc3")


def gen_checkpoint(name: str, seed: int, target_r: int, prune_all_of: str | None) -> tuple[Case, dict[str, bytes]]:
    """Without `prune_all_of` every layer must keep at least one row (checked); with it, that layer's
    pattern is set to all False before saving, so peft saves and loads it with r = 0."""
    layers = [("fc1", 8, 16), ("fc2", 16, 12), ("fc3", 12, 10), ("head", 10, 4)]
    schedule = {"init_r": 4, "target_r": target_r, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
    config = {"layers": [list(layer) for layer in layers], "adalora": schedule}
    c = case("checkpoint", name, "float64", "an adapter trained and saved by peft, loaded, and run", config, seed)
    torch.manual_seed(seed)
    stack = Stack(layers).double()
    base_state = {k: v.clone() for k, v in stack.state_dict().items()}
    model = adalora(stack, target_modules=["fc1", "fc2", "fc3"], **schedule)
    params = [p for n, p in model.named_parameters() if any(part in n for part in PARTS)]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    rng = np.random.default_rng(seed)
    for step in range(1, 13):
        out = model.base_model(torch.tensor(rng.normal(size=(8, 8))), torch.tensor(rng.normal(size=(8, 4))))
        out.loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    if prune_all_of is not None:  # a layer that lost every singular value: saved with r = 0
        key = f"{prune_all_of}.lora_E.default"
        pattern[key] = [False] * len(pattern[key])
    elif not all(any(keep) for keep in pattern.values()):
        raise RuntimeError(f"checkpoint/{name}: a layer lost every row ({pattern}); choose another seed")
    files = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            files[file] = (Path(tmp) / file).read_bytes()
        fresh = Stack(layers).double()
        fresh.load_state_dict(base_state)
        loaded = peft.PeftModel.from_pretrained(fresh, tmp).eval()
    for n, _, _ in layers:
        c.inputs[f"base.{n}.weight"] = t2n(base_state[f"{n}.weight"])
        c.inputs[f"base.{n}.bias"] = t2n(base_state[f"{n}.bias"])
    x = torch.tensor(rng.normal(size=(5, 8)))
    c.inputs["x"] = t2n(x)
    inner = loaded.base_model.model
    for n in ("fc1", "fc2", "fc3"):
        record(c, exact(f"r.{n}", "rank after loading", layer=n), int(lora(getattr(inner, n), "lora_E").shape[0]))
        record(
            c,
            exact(f"ranknum.{n}", "ranknum after loading", layer=n),
            float(getattr(inner, n).ranknum["default"].detach()),
        )
    with torch.no_grad():
        record(c, tensor("y", "output after loading"), t2n(loaded.base_model.model(x).logits))
    return c, files
