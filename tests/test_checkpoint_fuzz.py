"""Fuzzing the checkpoint readers: damaged safetensors bytes, foreign tensors, odd headers. Every
input either loads (and then the model's outputs are finite) or raises our own clear error naming
the file: never a foreign exception, never a silent non-finite model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_safetensors_bytes

from adalora_ref.checkpoint import WEIGHTS_NAME, adapter_state_dict, load_adapter, save_adapter

from .test_checkpoint import base_layers, outputs, trained_model

OUTCOMES: Counter[str] = Counter()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
X = np.random.default_rng(4).normal(size=(2, 8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict[str, np.ndarray]]:
    model = trained_model()
    directory = tmp_path_factory.mktemp("ck")
    save_adapter(model, directory)
    return directory, (directory / WEIGHTS_NAME).read_bytes(), adapter_state_dict(model)


def attempt(label: str, directory: Path, weights: bytes) -> None:
    """Load `directory` with `weights` as its safetensors file; tally and check the outcome."""
    (directory / WEIGHTS_NAME).write_bytes(weights)
    try:
        model = load_adapter(directory, base_layers())
    except ValueError as err:  # our errors name the file they are about
        assert str(directory) in str(err), err
        OUTCOMES[f"{label}: refused"] += 1
        return
    assert np.all(np.isfinite(outputs(model, X)))
    OUTCOMES[f"{label}: loaded"] += 1


@FUZZ
@given(data=st.data())
def test_damaged_bytes(checkpoint: tuple[Path, bytes, dict], data: st.DataObject) -> None:
    directory, good, _ = checkpoint
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    attempt("damaged bytes", directory, bytes(damaged[:cut]) if data.draw(st.booleans()) else bytes(damaged))


@FUZZ
@given(data=st.data())
def test_foreign_tensors(checkpoint: tuple[Path, bytes, dict], data: st.DataObject) -> None:
    """The right keys with other dtypes, shapes or values; extra and missing keys."""
    directory, _, state = checkpoint
    tensors = {}
    for key, value in state.items():
        choice = data.draw(st.sampled_from(["keep", "dtype", "shape", "nan", "drop"]))
        if choice == "dtype":
            value = value.astype(data.draw(st.sampled_from([np.float16, np.float32, np.int32, np.int8, np.bool_])))
        elif choice == "shape":
            value = np.zeros(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        elif choice == "nan" and value.size:
            value = value.copy()
            value.flat[0] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if choice != "drop":
            tensors[key] = np.ascontiguousarray(value)
    if data.draw(st.booleans()):
        tensors[data.draw(st.sampled_from(["base_model.model.fc9.lora_A", "stray", "base_model.model.fc1.bias"]))] = (
            np.zeros(3)
        )
    attempt("foreign tensors", directory, save_safetensors_bytes(tensors, metadata={"format": "pt"}))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(data=st.data())
def test_odd_headers(checkpoint: tuple[Path, bytes, dict], data: st.DataObject) -> None:
    """The header's JSON replaced or one of its fields changed to any JSON value."""
    directory, good, _ = checkpoint
    size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + size])
    if data.draw(st.booleans()):
        header = data.draw(JSON_VALUES)
    else:
        key = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None or not isinstance(header[key], dict):
            header[key] = data.draw(JSON_VALUES)
        else:
            header[key][field] = data.draw(JSON_VALUES | st.sampled_from(["BF16", "F8_E4M3", "I64", "U16"]))
    text = json.dumps(header).encode()
    attempt("odd headers", directory, len(text).to_bytes(8, "little") + text + good[8 + size :])


def test_the_fuzzers_reached_both_outcomes() -> None:
    """Run after the fuzz tests above (file order): each fuzzer saw loads and refusals."""
    print("\ncheckpoint fuzz outcomes:", dict(sorted(OUTCOMES.items())), "total", sum(OUTCOMES.values()))
    for label in ("damaged bytes", "foreign tensors"):
        assert OUTCOMES[f"{label}: refused"] > 0, OUTCOMES
    assert OUTCOMES["foreign tensors: loaded"] + OUTCOMES["damaged bytes: loaded"] > 0, OUTCOMES
    assert OUTCOMES["odd headers: refused"] > 0, OUTCOMES
