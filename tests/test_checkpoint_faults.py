"""Checkpoint saves under faults: every filesystem call of a save fails in turn, a saving process
dies at each of them, and a saving process is killed; after each, the directory loads whole (the old
checkpoint or the new one, never a mix) and nothing the save did not write has changed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from adalora_ref.checkpoint import CONFIG_NAME, STAGING_PREFIX, WEIGHTS_NAME, load_adapter, save_adapter
from adalora_ref.model import AdaLoraModel

from .test_checkpoint import base_layers, outputs, trained_model

# Every os function a save calls to change the filesystem or flush it (Path.mkdir, Path.unlink and
# the glob of leftovers go through these as well).
FS_CALLS = ("mkdir", "open", "write", "fsync", "close", "replace", "rename", "unlink", "rmdir")
X = np.random.default_rng(5).normal(size=(3, 8))


@contextlib.contextmanager
def fault_at(index: int | None, fault: Callable[[str], None]) -> Iterator[list[str]]:
    """Count the filesystem calls made inside the block; call `fault(name)` instead of call `index`."""
    calls: list[str] = []
    real = {name: getattr(os, name) for name in FS_CALLS}

    def wrap(name: str) -> Callable:
        def call(*args, **kwargs):
            calls.append(name)
            if len(calls) - 1 == index:
                fault(name)
            return real[name](*args, **kwargs)

        return call

    for name in FS_CALLS:
        setattr(os, name, wrap(name))
    try:
        yield calls
    finally:
        for name, function in real.items():
            setattr(os, name, function)


def injected_error(name: str) -> None:
    raise OSError(errno.EIO, f"injected failure of os.{name}")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` but the checkpoint's own two and save leftovers: must never change."""
    own = {CONFIG_NAME, WEIGHTS_NAME}
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in own and not rel.startswith(STAGING_PREFIX):
            out[rel] = path.read_bytes()
    return out


def which(directory: Path, old: AdaLoraModel, new: AdaLoraModel) -> str:
    """'old' or 'new': the checkpoint `directory` loads as, whole (every layer's rank and the outputs)."""
    loaded = load_adapter(directory, base_layers())
    ranks, y = {n: layer.r for n, layer in loaded.adapted.items()}, outputs(loaded, X)
    for label, model in (("old", old), ("new", new)):
        kept = {name: sum(keep) for name, keep in model.layer_rank_pattern().items()}
        if ranks == kept and np.allclose(y, outputs(model, X), rtol=1e-12, atol=1e-12):
            return label
    raise AssertionError(f"{directory} loads as neither the old checkpoint nor the new one")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdaLoraModel, AdaLoraModel, AdaLoraModel]:
    """Three different checkpoints: the old, the new, and a second adapter's. The new one is the old
    with lora_alpha 3 instead of 8: the same shapes, so a mix of their files would load without error."""
    old = trained_model(12)
    edited = tmp_path_factory.mktemp("edited")
    save_adapter(old, edited)
    config = json.loads((edited / CONFIG_NAME).read_text())
    (edited / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 3.0}))
    new = load_adapter(edited, base_layers())
    assert not np.allclose(outputs(new, X), outputs(old, X))
    return old, new, trained_model(4)


def populated(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> Path:
    """A checkpoint directory as users have them: the old checkpoint, a README, a second adapter."""
    old, _, other = models
    target = tmp_path / "ck"
    save_adapter(old, target)
    save_adapter(other, target / "other", adapter_name="default")
    (target / "README.md").write_text("model card")
    return target


def count_calls(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> list[str]:
    target = populated(tmp_path / "count", models)
    with fault_at(None, injected_error) as calls:
        save_adapter(models[1], target)
    return list(calls)


def test_a_resave_keeps_subfolders_and_other_files(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> None:
    """The bug this replaces: re-saving DIR deleted DIR/other, another adapter saved inside it."""
    old, new, other = models
    target = populated(tmp_path, models)
    before = snapshot(target)
    save_adapter(new, target)
    assert snapshot(target) == before
    assert which(target, old, new) == "new"
    assert np.array_equal(outputs(load_adapter(target / "other", base_layers()), X), outputs(other, X))
    assert sorted(p.name for p in target.iterdir()) == sorted(["README.md", "other", CONFIG_NAME, WEIGHTS_NAME])


def test_each_filesystem_call_failing_leaves_old_or_new(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> None:
    old, new, _ = models
    calls = count_calls(tmp_path, models)
    assert {"open", "write", "fsync", "replace"} <= set(calls), calls
    outcomes = []
    for index, name in enumerate(calls):
        target = populated(tmp_path / str(index), models)
        before = snapshot(target)
        with fault_at(index, injected_error):
            try:
                save_adapter(new, target)
                raised = False
            except OSError as err:
                assert "injected failure" in str(err)
                raised = True
        loaded_as = which(target, old, new)
        assert raised or loaded_as == "new", f"call {index} (os.{name}) failed silently and left the old checkpoint"
        assert snapshot(target) == before, f"call {index} (os.{name}): a file the save did not write changed"
        outcomes.append(loaded_as)
        save_adapter(new, target)  # the next save completes and leaves nothing of the failed one
        assert sorted(p.name for p in target.iterdir()) == sorted(["README.md", "other", CONFIG_NAME, WEIGHTS_NAME])
        assert which(target, old, new) == "new"
    # the faults fall both before the commit (old) and after the weights are in place (new)
    assert {"old", "new"} <= set(outcomes), outcomes


def test_a_process_dying_at_each_filesystem_call_leaves_old_or_new(
    tmp_path: Path, models: tuple[AdaLoraModel, ...]
) -> None:
    """A crash (no exception handler runs, no cleanup) at every call of the save, in a forked child."""
    old, new, _ = models
    calls = count_calls(tmp_path, models)

    def die(name: str) -> None:
        os._exit(17)

    outcomes = []
    for index, name in enumerate(calls):
        target = populated(tmp_path / str(index), models)
        before = snapshot(target)
        pid = os.fork()
        if pid == 0:  # the child saves and dies at call `index`
            code = 0
            try:
                with fault_at(index, die):
                    save_adapter(new, target)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 17, f"call {index} (os.{name}) was not reached in the child"
        outcomes.append(which(target, old, new))
        assert snapshot(target) == before, f"crash at call {index} (os.{name}) changed a file the save did not write"
        save_adapter(new, target)
        assert not list(target.glob(f"{STAGING_PREFIX}*")), "the next save left a crashed save's staging folder"
    assert {"old", "new"} <= set(outcomes), outcomes


KILL_LOOP = """
import sys
from adalora_ref.checkpoint import load_adapter, save_adapter
from tests.test_checkpoint import base_layers
models = [load_adapter(path, base_layers()) for path in sys.argv[2:]]
print("ready", flush=True)
i = 0
while True:
    save_adapter(models[i % 2], sys.argv[1])
    i += 1
"""


def test_a_killed_saving_process_leaves_a_loadable_checkpoint(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> None:
    """SIGKILL a process that saves the old and the new checkpoint in turn, at several moments; each
    time DIR loads whole and the files the saves did not write are as they were."""
    old, new, _ = models
    sources = [tmp_path / "old", tmp_path / "new"]
    for model, source in zip((old, new), sources, strict=True):
        save_adapter(model, source)
    target = populated(tmp_path, models)
    before = snapshot(target)
    root = Path(__file__).resolve().parents[1]
    seen = []
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        args = [sys.executable, "-c", KILL_LOOP, str(target), *map(str, sources)]
        child = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        seen.append(which(target, old, new))
        assert snapshot(target) == before
    save_adapter(new, target)
    assert not list(target.glob(f"{STAGING_PREFIX}*")), seen


def test_an_interrupted_commit_loads_as_the_new_checkpoint(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> None:
    """The state a crash between the two renames leaves, by hand: new weights, old config beside them."""
    old, new, _ = models
    target = populated(tmp_path, models)
    with fault_at(None, injected_error) as calls:
        save_adapter(new, target)
    second_replace = [i for i, name in enumerate(calls) if name == "replace"][1]
    target = populated(tmp_path / "again", models)
    with fault_at(second_replace, injected_error), pytest.raises(OSError):
        save_adapter(new, target)
    staged = list(target.glob(f"{STAGING_PREFIX}*/{CONFIG_NAME}"))
    assert len(staged) == 1 and staged[0].read_bytes() != (target / CONFIG_NAME).read_bytes()
    assert which(target, old, new) == "new"


def test_a_hand_edited_config_is_read_as_it_is(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> None:
    """The weights' config hash only picks a staged config; with none, the config beside them is the user's."""
    target = populated(tmp_path, models)
    config = json.loads((target / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = "edited by hand"
    (target / CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_adapter(target, base_layers())
    assert loaded.config.base_model_name_or_path == "edited by hand"


def test_saved_files_and_folders_follow_the_umask(tmp_path: Path, models: tuple[AdaLoraModel, ...]) -> None:
    previous = os.umask(0o022)
    try:
        save_adapter(models[0], tmp_path / "fresh" / "ck")
    finally:
        os.umask(previous)
    for path, mode in ((tmp_path / "fresh", 0o755), (tmp_path / "fresh" / "ck", 0o755)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / "fresh" / "ck" / name).stat().st_mode) == 0o644, name
