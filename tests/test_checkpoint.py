"""Model directories: round trip, atomic replacement, and clear errors for broken ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from har_flax import checkpoint
from har_flax.config import tiny
from har_flax.logs import without_absl_notices

CLASSES = ["calling", "clapping", "cycling"]


def _variables(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}},
        "batch_stats": {"bn": {"mean": rng.normal(size=(3,)).astype(np.float32)}},
    }


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_keeps_config_classes_metadata_and_arrays(tmp_path):
    variables = _variables(0)
    out = checkpoint.save_model(
        tmp_path / "model",
        config=tiny(),
        classes=CLASSES,
        variables=variables,
        metadata={"version": "v7"},
    )
    config, labels, restored = checkpoint.load_model(out)
    assert config == tiny()
    assert labels == {"classes": CLASSES, "kind": "action", "version": "v7"}
    np.testing.assert_array_equal(
        restored["params"]["dense"]["kernel"], variables["params"]["dense"]["kernel"]
    )
    np.testing.assert_array_equal(
        restored["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"]
    )
    assert _leftovers(tmp_path) == []


def test_class_order_is_kept_as_given(tmp_path):
    # Index i is logit i: names out of alphabetical order must not be sorted (that relabels).
    classes = ["texting", "calling", "sleeping"]
    checkpoint.save_model(tmp_path / "m", config=tiny(), classes=classes, variables=_variables(0))
    saved = json.loads((tmp_path / "m" / checkpoint.LABELS_FILE).read_text())
    assert saved["classes"] == classes
    assert checkpoint.load_model(tmp_path / "m")[1]["classes"] == classes
    # Extra facts cannot relabel the outputs either.
    for key in ("classes", "kind"):
        with pytest.raises(ValueError, match=rf"metadata cannot set \['{key}'\]"):
            checkpoint.save_model(tmp_path / "n", config=tiny(), classes=classes,
                                  variables=_variables(0), metadata={key: "x"})  # fmt: skip
    assert not (tmp_path / "n").exists()


def test_saving_again_replaces_the_whole_directory(tmp_path):
    path = tmp_path / "model"
    checkpoint.save_model(path, config=tiny(), classes=CLASSES, variables=_variables(0))
    checkpoint.save_model(path, config=tiny(), classes=CLASSES, variables=_variables(1))
    _, _, restored = checkpoint.load_model(path)
    np.testing.assert_array_equal(
        restored["params"]["dense"]["kernel"], _variables(1)["params"]["dense"]["kernel"]
    )
    assert _leftovers(tmp_path) == []


def test_a_failed_save_leaves_the_previous_model_intact(tmp_path):
    path = tmp_path / "model"
    checkpoint.save_model(path, config=tiny(), classes=CLASSES, variables=_variables(0))
    broken = {"params": {"dense": {"kernel": object()}}}  # orbax cannot write this
    with pytest.raises(Exception):  # noqa: B017 - whatever orbax raises, the old model survives
        checkpoint.save_model(path, config=tiny(), classes=CLASSES, variables=broken)
    _, labels, restored = checkpoint.load_model(path)
    assert labels["classes"] == CLASSES
    np.testing.assert_array_equal(
        restored["params"]["dense"]["kernel"], _variables(0)["params"]["dense"]["kernel"]
    )
    assert _leftovers(tmp_path) == []


def test_class_count_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        checkpoint.save_model(
            tmp_path / "m", config=tiny(), classes=CLASSES[:2], variables=_variables(0)
        )
    assert not (tmp_path / "m").exists()


def test_load_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope")
    path = checkpoint.save_model(
        tmp_path / "model", config=tiny(), classes=CLASSES, variables=_variables(0)
    )
    labels = path / checkpoint.LABELS_FILE
    labels.write_text(json.dumps({"classes": ["a"], "kind": "action"}))
    with pytest.raises(checkpoint.CheckpointError, match="expected 3 class names"):
        checkpoint.load_model(path)
    labels.write_text(json.dumps(CLASSES))  # a list, not {"classes": ...}
    with pytest.raises(checkpoint.CheckpointError, match="labels.json must be a JSON object"):
        checkpoint.load_model(path)
    (path / checkpoint.CONFIG_FILE).write_text("[]")  # blamed on config.json, not on labels
    with pytest.raises(checkpoint.CheckpointError, match="config.json is unreadable .*not list"):
        checkpoint.load_model(path)
    (path / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="config.json is unreadable"):
        checkpoint.load_model(path)
    (path / checkpoint.CONFIG_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing$"):
        checkpoint.load_model(path)
    # A work directory given where its model is meant: the error says where the model is.
    work = tmp_path / "work"
    checkpoint.save_model(work / "model", config=tiny(), classes=CLASSES, variables=_variables(0))
    with pytest.raises(checkpoint.CheckpointError, match="training work directory: its model is"):
        checkpoint.load_model(work)
    with pytest.raises(checkpoint.CheckpointError, match="is a file; a model is a directory"):
        checkpoint.load_model(labels)


def _corrupt_variables(variables, how: str) -> None:
    if how == "emptied":
        for p in variables.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif how == "a file":
        shutil.rmtree(variables)
        variables.write_bytes(b"")
    else:  # every array file cut in half
        for p in variables.rglob("*"):
            if p.is_file() and p.parent.name != variables.name and p.stat().st_size > 8:
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("how", ["emptied", "a file", "truncated"])
def test_damaged_weights_are_a_checkpoint_error_naming_them(tmp_path, how):
    path = checkpoint.save_model(
        tmp_path / "model", config=tiny(), classes=CLASSES, variables=_variables(0)
    )
    _corrupt_variables(path / checkpoint.VARIABLES_DIR, how)
    with pytest.raises(checkpoint.CheckpointError, match="variables: the weights are unreadable"):
        checkpoint.load_model(path)


def test_a_damaged_model_is_one_short_error_for_a_person(tmp_path):
    """har-predict on a model cut short: its error, in a line, and no tracebacks after it
    (orbax's abandoned reads, "Event loop is closed"), no kilobyte of tensorstore spec."""
    path = checkpoint.save_model(
        tmp_path / "model", config=tiny(), classes=CLASSES, variables=_variables(0)
    )
    _corrupt_variables(path / checkpoint.VARIABLES_DIR, "truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.predict", "--model", str(path), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"har-predict: error: {path / 'variables'}: the weights are unread")
    assert "the model directory is damaged" in line and len(line) < 800, line


def test_a_directory_of_other_files_is_never_replaced_by_a_model(tmp_path):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "thesis.txt").write_text("precious")
    with pytest.raises(checkpoint.CheckpointError, match=r"not a model directory \(it holds sub, "):
        checkpoint.save_model(home, config=tiny(), classes=CLASSES, variables=_variables(0))
    assert (home / "thesis.txt").read_text() == "precious" and (home / "sub").is_dir()
    assert _leftovers(tmp_path) == []
    with pytest.raises(checkpoint.CheckpointError, match="thesis.txt is a file"):
        checkpoint.save_model(
            home / "thesis.txt" / "m", config=tiny(), classes=CLASSES, variables=_variables(0)
        )
    # An empty directory, or one holding a model, is a fine destination.
    (tmp_path / "empty").mkdir()
    for _ in range(2):
        checkpoint.save_model(
            tmp_path / "empty", config=tiny(), classes=CLASSES, variables=_variables(0)
        )
    assert checkpoint.load_model(tmp_path / "empty")[1]["classes"] == CLASSES


@pytest.mark.parametrize("present", [["config.json"], ["labels.json", "variables"]])
def test_a_directory_with_only_some_model_files_is_not_a_model(tmp_path, present):
    # A user's folder that happens to hold a config.json (say) is not replaced by a model.
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    for name in present:
        if name == checkpoint.VARIABLES_DIR:
            (home / name).mkdir()
        else:
            (home / name).write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="exists and is not a model directory"):
        checkpoint.save_model(home, config=tiny(), classes=CLASSES, variables=_variables(0))
    assert (home / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in home.iterdir()) == sorted(["notes.txt", *present])


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    stale_tmp, fresh_tmp = tmp_path / ".model.tmp-0ded3ff6", tmp_path / ".model.tmp-27ad0fc6"
    old, other = tmp_path / ".model.old-616c6993", tmp_path / ".other.tmp-97e28336"
    for d in (stale_tmp, fresh_tmp, old, other):
        (d / "variables").mkdir(parents=True)
    hours_ago = time.time() - 2 * 3600
    for d in (stale_tmp, other):
        os.utime(d, (hours_ago, hours_ago))
    checkpoint.save_model(
        tmp_path / "model", config=tiny(), classes=CLASSES, variables=_variables(0)
    )
    # A fresh tmp may be another process's save in flight; another model's are not ours.
    assert _leftovers(tmp_path) == sorted([fresh_tmp.name, other.name])


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "report.json"
    checkpoint.atomic_write_text(target, "first")
    checkpoint.atomic_write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    checkpoint.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []
    # Readable by others as a plainly written file is (not the temporary file's 0o600).
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    old = os.umask(0o027)
    try:
        checkpoint.atomic_write_text(target, "third")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o640


# --- Training checkpoints (saved in the background) ---------------------------------------------


def test_a_background_save_keeps_the_state_of_its_moment(tmp_path):
    import jax

    # What fit does right after a save: the next steps donate the state's buffers (on this CPU
    # they are host memory) and the progress dict changes, while the save is being written.
    state = {f"w{i}": jax.numpy.full((256, 1024), float(i)) for i in range(8)}
    saved = jax.device_get(state)
    progress = {"epoch": 1, "sums": {"loss": 1.5}}
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 3.0 + 1.0, s), donate_argnums=0)

    ckpts = checkpoint.TrainCheckpoints(tmp_path / "checkpoints")
    ckpts.save("latest", 4, state, progress)
    progress["epoch"], progress["sums"]["loss"] = 2, 0.0
    for _ in range(5):
        state = step(state)
    jax.block_until_ready(state)

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, restored_progress = ckpts.restore("latest", abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    assert restored_progress == {"epoch": 1, "sums": {"loss": 1.5}}
    assert ckpts.latest_step() == 4

    # Saving the same step again replaces it; a new manager on the folder finds the last one.
    ckpts.save("latest", 4, state, progress)
    ckpts.close()
    again = checkpoint.TrainCheckpoints(tmp_path / "checkpoints")
    restored, restored_progress = again.restore("latest", abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    assert restored_progress["epoch"] == 2 and again.latest_step("best") is None
    again.close()


def _cut_in_half(folder) -> None:
    for p in folder.rglob("*"):
        if p.is_file() and p.parent.name == "d" and p.stat().st_size > 8:  # OCDBT data files
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_a_damaged_training_checkpoint_is_called_damaged_with_no_late_tracebacks(
    tmp_path, monkeypatch
):
    import jax

    late = []  # what Python reports but cannot raise (threads' and callbacks' exceptions)
    monkeypatch.setattr(sys, "unraisablehook", late.append)
    state = {f"w{i}": jax.numpy.full((64, 256), float(i)) for i in range(4)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    ckpts = checkpoint.TrainCheckpoints(tmp_path / "checkpoints")
    ckpts.save("latest", 3, state, {"epoch": 1})
    try:
        # Another model: named as such, in orbax's words.
        with pytest.raises(checkpoint.CheckpointError, match=r"\(step 3\) does not match this "
                           r"model: Structure mismatch: Target path \('w9',\)"):  # fmt: skip
            ckpts.restore("latest", {**abstract, "w9": abstract["w0"]})
        _cut_in_half(tmp_path / "checkpoints" / "latest")
        with pytest.raises(checkpoint.CheckpointError) as e:
            ckpts.restore("latest", abstract)
    finally:
        ckpts.close()
    message = str(e.value)
    assert "(step 3) is damaged: OUT_OF_RANGE: " in message, message
    assert "start it in a new work directory" in message and "does not match" not in message
    assert "tensorstore_spec" not in message and len(message) < 800, message
    # The reads the failure left behind end without a traceback each ("Event loop is closed").
    time.sleep(0.5)
    assert late == [], [str(u.exc_value) for u in late]


def test_a_save_cut_off_by_a_kill_is_cleared_before_the_manager_is_used(tmp_path):
    # orbax clears such folders in a background thread that close() does not wait for; still
    # running when a process exits (Ctrl-C as har-train starts), it died there with a
    # traceback. So the manager waits for it: the folder is gone once it is built.
    # (Many, so that clearing them takes a while.)
    unfinished = [tmp_path / "checkpoints" / "latest" / f"{i}.orbax-checkpoint-tmp-17000{i}"
                  for i in range(200)]  # fmt: skip
    for folder in unfinished:
        (folder / "state").mkdir(parents=True)
        for name in ("a", "b", "c"):
            (folder / "state" / name).write_bytes(b"\0" * 100)
    ckpts = checkpoint.TrainCheckpoints(tmp_path / "checkpoints")
    try:
        assert not any(folder.exists() for folder in unfinished)
        assert ckpts.latest_step() is None
    finally:
        ckpts.close()


def test_orbax_advice_to_save_less_often_is_not_shown(caplog):
    import logging

    absl = logging.getLogger("absl")
    with caplog.at_level(logging.INFO, logger="absl"):
        with without_absl_notices(checkpoint.ORBAX_WAIT_NOTICE):
            # What orbax logs when a save waits for the one before (every epoch of a short run).
            absl.warning("Waiting for previous save to complete took %f seconds. If this number "
                         "is high, consider checkpointing less frequently.", 1.29)  # fmt: skip
            absl.warning("Finished saving checkpoint")
        absl.warning("Waiting for previous save to complete took 2.0 seconds.")  # outside: shown
    assert [r.getMessage() for r in caplog.records] == [
        "Finished saving checkpoint",
        "Waiting for previous save to complete took 2.0 seconds.",
    ]
