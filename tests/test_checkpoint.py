"""Checkpoints: peft's adapter format both ways, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adalora_ref import checkpoint
from adalora_ref._backend import get_backend
from adalora_ref.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from adalora_ref.config import AdaLoraConfig
from adalora_ref.mlp import MLP, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import train_step

from .peft_live import require_peft, t2n
from .test_layer import assert_close
from .test_peft_trajectory import LAYERS, TARGETS, torch_mlp

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}


def base_layers(seed: int = 0) -> dict[str, BaseLinear]:
    rng = np.random.default_rng(seed)
    xp = get_backend("numpy")
    return {
        name: BaseLinear(xp.asarray(rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)), xp.asarray(rng.normal(size=n_out)))
        for name, n_in, n_out in LAYERS
    }


def trained_model(steps: int = 12, lora_alpha: float = 8.0) -> AdaLoraModel:
    """A reference model trained through its final masking, so it has a rank pattern."""
    model = AdaLoraModel(base_layers(), AdaLoraConfig(target_modules=TARGETS, lora_alpha=lora_alpha, **SCHEDULE))
    net, opt, rng = MLP(model), AdamW(lr=0.05), np.random.default_rng(1)
    for step in range(1, steps + 1):
        train_step(net, opt, rng.normal(size=(8, 8)), rng.normal(size=(8, 4)), step, mse_loss)
    assert model.config.rank_pattern is not None
    return model


def outputs(model: AdaLoraModel, x: np.ndarray) -> np.ndarray:
    return np.asarray(MLP(model).forward(x)[0])


def test_round_trip_ours(tmp_path: Path) -> None:
    model = trained_model()
    save_adapter(model, tmp_path / "ck")
    loaded = load_adapter(tmp_path / "ck", base_layers())
    x = np.random.default_rng(2).normal(size=(5, 8))
    assert_close(outputs(loaded, x), outputs(model, x), 1e-14, "outputs after load")
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in model.config.rank_pattern.items()}
    assert {n: layer.r for n, layer in loaded.adapted.items()} == kept
    for name, layer in loaded.adapted.items():  # ranknum stays init_r (0 for an emptied layer, as peft)
        assert float(layer.ranknum[0]) == (SCHEDULE["init_r"] if layer.r else 0.0), name
    saved = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "ADALORA" and saved["inference_mode"] is True and "deltaT" in saved


def torch_base_from(layers: dict[str, BaseLinear]):
    torch, _ = require_peft()
    net = torch_mlp("mse").double()
    with torch.no_grad():
        for name, layer in layers.items():
            getattr(net, name).weight.copy_(torch.tensor(np.asarray(layer.weight)))
            getattr(net, name).bias.copy_(torch.tensor(np.asarray(layer.bias)))
    return net


@pytest.mark.peft
def test_peft_loads_what_we_save(tmp_path: Path) -> None:
    torch, peft = require_peft()
    model = trained_model()
    save_adapter(model, tmp_path / "ck")
    peft_model = peft.PeftModel.from_pretrained(torch_base_from(base_layers()), tmp_path / "ck").eval()
    x = np.random.default_rng(3).normal(size=(6, 8))
    with torch.no_grad():
        theirs = t2n(peft_model.base_model.model(torch.tensor(x), torch.zeros(6, 4, dtype=torch.float64)).logits)
    assert_close(outputs(model, x), theirs, 1e-12, "peft's outputs on our checkpoint")


@pytest.mark.peft
def test_we_load_what_peft_saves(tmp_path: Path) -> None:
    """peft trains through its final masking, saves (cut to the rank pattern); we load and agree."""
    torch, peft = require_peft()
    layers = base_layers(5)
    peft_model = peft.get_peft_model(
        torch_base_from(layers), peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=8, **SCHEDULE)
    )
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=0.05)
    rng = np.random.default_rng(6)
    for step in range(1, 13):
        out = peft_model.base_model(torch.tensor(rng.normal(size=(8, 8))), torch.tensor(rng.normal(size=(8, 4))))
        out.loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(torch_base_from(layers), tmp_path / "peft").eval()
    x = np.random.default_rng(7).normal(size=(4, 8))
    with torch.no_grad():
        theirs = t2n(reloaded.base_model.model(torch.tensor(x), torch.zeros(4, 4, dtype=torch.float64)).logits)
    ours = load_adapter(tmp_path / "peft", layers)
    pattern = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["rank_pattern"]
    assert {n: layer.r for n, layer in ours.adapted.items()} == {
        k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()
    }
    assert_close(outputs(ours, x), theirs, 1e-12, "our outputs on peft's checkpoint")


def test_load_needs_no_torch(tmp_path: Path) -> None:
    """Loading runs with torch made unimportable."""
    save_adapter(trained_model(), tmp_path / "ck")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from tests.test_checkpoint import base_layers\n"
        "from adalora_ref.checkpoint import load_adapter\n"
        f"m = load_adapter({str(tmp_path / 'ck')!r}, base_layers())\n"
        "print(sorted(m.adapted))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(TARGETS))


class TestAtomicWrites:  # every crash point of a save: tests/test_checkpoint_faults.py
    def test_failure_while_writing_leaves_old_untouched(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        target = tmp_path / "ck"
        save_adapter(trained_model(), target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}

        def failing_fsync(fd):
            raise OSError("I/O error")

        monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="I/O error"):
            save_adapter(trained_model(4), target)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

    def test_save_keeps_other_files(self, tmp_path: Path) -> None:
        target = tmp_path / "ck"
        target.mkdir()
        (target / "README.md").write_text("model card")
        save_adapter(trained_model(), target)
        assert sorted(p.name for p in target.iterdir()) == sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME])


class TestBadFiles:
    @pytest.fixture
    def saved(self, tmp_path: Path) -> Path:
        save_adapter(trained_model(), tmp_path / "ck")
        return tmp_path / "ck"

    def test_truncated_weights(self, saved: Path) -> None:
        path = saved / WEIGHTS_NAME
        path.write_bytes(path.read_bytes()[:-50])
        with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
            load_adapter(saved, base_layers())

    def test_missing_weights_file(self, saved: Path) -> None:
        (saved / WEIGHTS_NAME).unlink()
        with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
            load_adapter(saved, base_layers())

    def test_missing_tensor(self, saved: Path) -> None:
        from safetensors.numpy import load_file, save_file

        path = saved / WEIGHTS_NAME
        tensors = load_file(str(path))
        del tensors["base_model.model.fc2.lora_B"]
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match=r"missing tensor\(s\) \['base_model.model.fc2.lora_B'\]"):
            load_adapter(saved, base_layers())

    def test_shape_contradicts_rank_pattern(self, saved: Path) -> None:
        path = saved / CONFIG_NAME
        cfg = json.loads(path.read_text())
        key = next(k for k, v in cfg["rank_pattern"].items() if not all(v))
        cfg["rank_pattern"][key] = [True] * len(cfg["rank_pattern"][key])
        path.write_text(json.dumps(cfg))
        layer = key.removesuffix(".lora_E")
        with pytest.raises(ValueError, match=rf"base_model.model.{layer}.lora_A has shape"):
            load_adapter(saved, base_layers())

    def test_corrupt_config(self, saved: Path) -> None:
        (saved / CONFIG_NAME).write_text("{not json")
        with pytest.raises(ValueError, match=CONFIG_NAME):
            load_adapter(saved, base_layers())


class TestTensorDtypes:
    """Floating tensors of any width load cast to the model's dtype (peft's load_state_dict copies
    them so); integer tensors are refused, naming the key."""

    @pytest.fixture
    def saved(self, tmp_path: Path) -> tuple[AdaLoraModel, Path]:
        model = trained_model()
        save_adapter(model, tmp_path / "ck")
        return model, tmp_path / "ck"

    @staticmethod
    def rewrite(path: Path, convert) -> None:
        from safetensors.numpy import load_file, save_file

        save_file({k: convert(v) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})

    def test_float16_loads_cast(self, saved: tuple[AdaLoraModel, Path]) -> None:
        model, directory = saved
        self.rewrite(directory / WEIGHTS_NAME, lambda v: v.astype(np.float16))
        x = np.random.default_rng(2).normal(size=(5, 8))
        loaded = load_adapter(directory, base_layers())
        assert loaded.triplets()["fc2"].lora_A.dtype == np.float64
        assert_close(outputs(loaded, x), outputs(model, x), 1e-2, "outputs from float16 tensors")

    def test_bfloat16_loads_as_its_float32_value(self, saved: tuple[AdaLoraModel, Path]) -> None:
        """NumPy has no bfloat16: the reader widens its bit pattern (the upper half of a float32)."""
        model, directory = saved
        path = directory / WEIGHTS_NAME
        self.rewrite(path, lambda v: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        for key, spec in header.items():
            if key != "__metadata__":
                spec["dtype"] = "BF16"
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])
        tensors = checkpoint.read_adapter_tensors(path)
        for key, value in checkpoint.adapter_state_dict(model).items():
            truncated = (value.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
            assert tensors[key].dtype == np.float32 and np.array_equal(tensors[key], truncated), key
        load_adapter(directory, base_layers())

    def test_integer_tensors_are_refused(self, saved: tuple[AdaLoraModel, Path]) -> None:
        _, directory = saved
        self.rewrite(directory / WEIGHTS_NAME, lambda v: v.astype(np.int32))
        with pytest.raises(ValueError, match=r"tensor base_model\.model\.\w+\.lora_\w has dtype I32; adapter tensors"):
            load_adapter(directory, base_layers())

    def test_a_corrupt_header_is_named(self, saved: tuple[AdaLoraModel, Path]) -> None:
        _, directory = saved
        path = directory / WEIGHTS_NAME
        path.write_bytes((10**9).to_bytes(8, "little") + path.read_bytes()[8:])
        with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
            load_adapter(directory, base_layers())
        path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
        with pytest.raises(ValueError, match="not a JSON object"):
            load_adapter(directory, base_layers())

    @pytest.mark.peft
    def test_bfloat16_written_by_torch(self, tmp_path: Path) -> None:
        torch, _ = require_peft()
        from safetensors.torch import save_file

        values = torch.randn(3, 5, dtype=torch.float64).to(torch.bfloat16)
        save_file({"base_model.model.fc2.lora_A": values}, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
        read = checkpoint.read_adapter_tensors(tmp_path / WEIGHTS_NAME)["base_model.model.fc2.lora_A"]
        assert np.array_equal(read, values.float().numpy())
