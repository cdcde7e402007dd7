"""The tfds builder: arrays equal decode + resize of the source files, cached per size and data."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from har_flax.config import DataConfig
from har_flax.data import DataError, load_splits
from har_flax.data.har_builder import _REMOVING, HarKaggle, fingerprint, images_array, prepare
from har_flax.data.synthetic import write_synthetic_kaggle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_kaggle(
        tmp_path_factory.mktemp("syn") / "data", train_per_class=5, test_count=4, seed=2
    )


def _reference(path, size):
    """Independent of har_flax.images: Pillow's decode and bilinear resize, as documented."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))[1:]


def test_round_trip_equals_decode_and_resize(data_dir, tmp_path):
    splits = load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    assert splits.classes == ("calling", "clapping", "cycling")
    label_of = dict(_rows(data_dir / "Training_set.csv"))
    for source in (splits.train, splits.val):
        images, labels = source.get_batch(np.arange(len(source)))
        assert images.shape == (len(source), 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, source.labels)
        for name, image, label in zip(source.filenames, images, labels, strict=True):
            np.testing.assert_array_equal(image, _reference(data_dir / "train" / name, 32))
            assert splits.classes[label] == label_of[name]
    assert sorted(splits.train.filenames + splits.val.filenames) == sorted(label_of)

    # The test split: CSV order, no labels, the same arrays.
    test_names = [r[0] for r in _rows(data_dir / "Testing_set.csv")]
    assert list(splits.test.filenames) == test_names
    images, labels = splits.test.get_batch([3, 0])
    np.testing.assert_array_equal(labels, [-1, -1])
    np.testing.assert_array_equal(images[0], _reference(data_dir / "test" / test_names[3], 32))
    np.testing.assert_array_equal(images[1], _reference(data_dir / "test" / test_names[0], 32))
    assert splits.skipped == []

    # Random access in any order, repeats allowed; out of range is an error.
    images, labels = splits.train.get_batch([2, 0, 2])
    np.testing.assert_array_equal(images[0], images[2])
    np.testing.assert_array_equal(labels, splits.train.labels[[2, 0, 2]])
    with pytest.raises(IndexError):
        splits.train.get_batch([len(splits.train)])


def test_array_record_files_and_sizes_do_not_collide(data_dir, tmp_path):
    b32 = prepare(data_dir, image_size=32, tfds_dir=tmp_path)
    b48 = prepare(data_dir, image_size=48, tfds_dir=tmp_path)
    assert b32.data_dir != b48.data_dir
    for b, s in ((b32, 32), (b48, 48)):
        assert b.info.file_format.value == "array_record"
        files = sorted(os.listdir(b.data_dir))
        assert any(f.startswith("har_kaggle-train.array_record") for f in files), files
        assert any(f.startswith("har_kaggle-test.array_record") for f in files), files
        assert b.info.features["image"].shape == (s, s, 3)
        assert b.as_data_source("train")[0]["image"].shape == (s, s, 3)
    assert b32.info.metadata["image_size"] == 32
    assert isinstance(b32, HarKaggle)


def test_preparing_leaves_nothing_in_the_temporary_folder(data_dir, tmp_path, monkeypatch):
    # TFDS made an empty tmp*tfds folder there per preparation (see _LocalDatasetInfo).
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    builder = prepare(data_dir, image_size=32, tfds_dir=tmp_path / "tfds")
    assert len(builder.as_data_source("train")) > 0
    assert os.listdir(tmp) == []


def test_prepared_once_and_rebuilt_when_the_data_changes(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    first = prepare(data, image_size=32, tfds_dir=tmp_path / "tfds")
    record = next(p for p in os.listdir(first.data_dir) if "train.array_record" in p)
    stamp = os.stat(os.path.join(first.data_dir, record)).st_mtime_ns
    again = prepare(data, image_size=32, tfds_dir=tmp_path / "tfds")
    assert again.data_dir == first.data_dir
    assert os.stat(os.path.join(first.data_dir, record)).st_mtime_ns == stamp  # not rewritten

    # One image replaced: a new fingerprint, a new copy holding the new pixels.
    before = fingerprint(data)
    Image.new("RGB", (64, 50), (0, 255, 0)).save(data / "train" / "Image_1.jpg")
    assert fingerprint(data) != before
    rebuilt = prepare(data, image_size=32, tfds_dir=tmp_path / "tfds")
    assert rebuilt.data_dir != first.data_dir
    source = rebuilt.as_data_source("train")
    stored = rebuilt.info.metadata["stored"]["train"]
    i = [f for f, _ in stored].index("Image_1.jpg")
    np.testing.assert_array_equal(source[i]["image"], _reference(data / "train/Image_1.jpg", 32))


def test_an_image_rewritten_at_the_same_size_changes_the_fingerprint(data_dir, tmp_path):
    # Re-saved in place (same name, same byte count, new pixels and time): not stale arrays.
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    image = data / "train" / "Image_2.jpg"
    before, size, mtime = fingerprint(data), image.stat().st_size, image.stat().st_mtime_ns
    image.write_bytes(bytes(b ^ 0xFF for b in image.read_bytes()))
    os.utime(image, ns=(mtime + 10**9, mtime + 10**9))
    assert image.stat().st_size == size
    assert fingerprint(data) != before


def test_works_without_tensorflow(data_dir, tmp_path):
    """Builds and reads in a fresh interpreter where TensorFlow is not installed, nor imported.

    tfds' writer spills a split of over 1 GB (the real training set at 224 px is 1.9 GB) to
    files through TensorFlow; lowering that limit to 1 KB here makes this small set take the
    same path, which must still work, and the limit must be left as it was.
    """
    code = f"""
import importlib.util, sys
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed here"
from tensorflow_datasets.core import shuffle
shuffle.MAX_MEM_BUFFER_SIZE = 1024
from har_flax.config import DataConfig
from har_flax.data import DataError, load_splits
s = load_splits({str(data_dir)!r}, {str(tmp_path)!r}, image_size=32, data_config=DataConfig())
x, y = s.train.get_batch([0, 1])
assert x.shape == (2, 32, 32, 3), x.shape
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
assert shuffle.MAX_MEM_BUFFER_SIZE == 1024, shuffle.MAX_MEM_BUFFER_SIZE
print("ok", len(s.train), len(s.val), len(s.test))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    # "TensorFlow is installed here": this proof needs the documented environment (no TF).
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok 12 3 4" in out.stdout


def test_no_progress_means_no_bars_and_restores_tfds_setting(data_dir, tmp_path, capfd):
    from tensorflow_datasets.core.utils import tqdm_utils

    before = tqdm_utils._active
    splits = load_splits(data_dir, tmp_path / "quiet", image_size=24, data_config=DataConfig(),
                         progress=False)  # fmt: skip
    assert len(splits.train) > 0
    err = capfd.readouterr().err
    assert "Decoding" not in err and "examples" not in err and "%|" not in err
    assert tqdm_utils._active == before
    # The default shows ours (the first build of another size, so it is not a cached no-op),
    # and not tfds' own, whose counts and file patterns mean nothing to a user.
    load_splits(data_dir, tmp_path / "loud", image_size=20, data_config=DataConfig())
    err = capfd.readouterr().err
    assert "Decoding train images to 20px" in err and "Decoding test images to 20px" in err
    assert "Generating" not in err and "Shuffling" not in err and "examples" not in err
    assert tqdm_utils._active == before


def _arrays(folder):
    return sorted(p for p in os.listdir(folder) if ".images-" in p and p.endswith(".npy"))


def test_arrays_are_copied_once_into_memory_mapped_files(data_dir, tmp_path):
    splits = load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    folder = splits.dataset_dir
    # Training reads only the labelled split; the test split's file waits for its first read.
    assert [f.split(".images-")[0] for f in _arrays(folder)] == ["har_kaggle-train"]
    test_images, test_labels = splits.test.get_batch([1, 0])
    assert test_images.shape == (2, 32, 32, 3) and list(test_labels) == [-1, -1]
    np.testing.assert_array_equal(
        test_images[1], prepare(data_dir, image_size=32, tfds_dir=tmp_path / "tfds")
        .as_data_source("test")[0]["image"]
    )  # fmt: skip
    files = _arrays(folder)
    assert [f.split(".images-")[0] for f in files] == ["har_kaggle-test", "har_kaggle-train"]
    stamps = {f: os.stat(folder / f).st_mtime_ns for f in files}
    umask = os.umask(0o022)
    os.umask(umask)
    for f in files:  # readable as any file the user makes, as on a disk shared between users
        assert os.stat(folder / f).st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
    # Row r of the file is record r of the array_record shards.
    builder = prepare(data_dir, image_size=32, tfds_dir=tmp_path / "tfds")
    array = np.load(folder / files[1], mmap_mode="r")
    records = builder.as_data_source("train")
    for r in (0, len(records) - 1):
        np.testing.assert_array_equal(array[r], records[r]["image"])

    again = load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    assert {f: os.stat(folder / f).st_mtime_ns for f in _arrays(folder)} == stamps  # reused
    images, _ = again.val.get_batch(np.arange(len(again.val)))
    expected, _ = splits.val.get_batch(np.arange(len(splits.val)))
    np.testing.assert_array_equal(images, expected)


def test_arrays_are_rebuilt_when_truncated_or_the_shards_change(data_dir, tmp_path):
    splits = load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    folder = splits.dataset_dir
    expected, _ = splits.train.get_batch(np.arange(len(splits.train)))
    (train_file,) = (folder / f for f in _arrays(folder))  # the test split's is not built yet

    with open(train_file, "r+b") as f:  # e.g. a full disk: a cut-off copy
        f.truncate(os.path.getsize(train_file) // 2)
    again = load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    np.testing.assert_array_equal(again.train.get_batch(np.arange(len(again.train)))[0], expected)
    assert os.path.getsize(train_file) > 32 * 32 * 3 * len(splits.train)

    # Shards rewritten (another mtime): a new file under a new name, the old one removed.
    shard = next(p for p in os.listdir(folder) if "train.array_record" in p)
    os.utime(folder / shard, ns=(1, 1))
    load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    files = _arrays(folder)
    assert len(files) == 1 and files[0] != train_file.name

    # What a killed build leaves (a hidden .tmp as large as the array) goes at the next read;
    # a fresh one may be another process's build in progress.
    killed, running = (folder / f".{files[0]}.{tag}.tmp" for tag in ("d574b84d", "0a1b2c3d"))
    for tmp in (killed, running):
        tmp.write_bytes(b"\0" * 1000)
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    assert not killed.exists() and running.exists()


def test_a_record_that_is_not_the_listed_image_is_an_error_leaving_no_file(data_dir, tmp_path):
    splits = load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    folder = splits.dataset_dir
    for f in _arrays(folder):
        os.remove(folder / f)
    # The metadata now lists two training images in swapped places.
    meta = json.loads((folder / "metadata.json").read_text())
    stored = meta["stored"]["train"]
    stored[0][0], stored[1][0] = stored[1][0], stored[0][0]
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"record 0 holds {stored[1][0]}, expected {stored[0][0]}"):
        load_splits(data_dir, tmp_path, image_size=32, data_config=DataConfig())
    assert not any(".images-" in p for p in os.listdir(folder))  # no partial file, no temp


def test_tfds_notices_that_ask_nothing_are_not_shown(data_dir, tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO):
        prepare(data_dir, image_size=16, tfds_dir=tmp_path)  # first time: a folder without info
        prepare(data_dir, image_size=16, tfds_dir=tmp_path)
    assert "preparing" in caplog.text  # other messages pass
    # tfds' "Downloading and preparing dataset Unknown size (download: Unknown size, ...)":
    # nothing is downloaded.
    out = capfd.readouterr().out
    assert "Downloading" not in out and "downloaded" not in out and "Unknown size" not in out
    assert f"prepared {tmp_path / 'har_kaggle'}" in caplog.text
    assert "Using custom data configuration" not in caplog.text
    assert "has no dataset_info.json" not in caplog.text
    assert not logging.getLogger("absl").filters  # the filter was only for those calls


def test_a_copy_prepared_meanwhile_by_another_run_is_used(data_dir, tmp_path, monkeypatch, caplog):
    """Two runs sharing a --download-dir: the one that finishes second uses the first's copy.

    tfds prepares into a temporary folder and renames it at the end; the second rename fails.
    To make that order certain, another process prepares the same copy completely while this
    one is generating its first example.
    """
    other = (f"from har_flax.data.har_builder import prepare; "
             f"prepare({str(data_dir)!r}, image_size=20, tfds_dir={str(tmp_path)!r})")  # fmt: skip
    generate = HarKaggle._generate_examples

    def racing(self, *args, **kwargs):
        if not getattr(racing, "done", False):
            racing.done = True
            subprocess.run([sys.executable, "-c", other], cwd=REPO, check=True, timeout=300)
        yield from generate(self, *args, **kwargs)

    monkeypatch.setattr(HarKaggle, "_generate_examples", racing)
    with caplog.at_level(logging.INFO):
        builder = prepare(data_dir, image_size=20, tfds_dir=tmp_path)
    assert racing.done and "prepared meanwhile by another run" in caplog.text
    assert builder.is_prepared()
    assert not [p for p in os.listdir(os.path.dirname(builder.data_dir)) if "incomplete" in p]
    splits = load_splits(data_dir, tmp_path / "w", image_size=20, data_config=DataConfig(),
                         download_dir=tmp_path)  # fmt: skip
    assert splits.dataset_dir == Path(builder.data_dir)


def test_a_changed_folder_s_new_copy_removes_its_old_copies_only(
    data_dir, tmp_path, monkeypatch, caplog
):
    """Each change of the data folder makes a copy of the whole set (2.8 GB for Kaggle's at
    224 px); the copies made before the change can never be read again."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="har_flax.data.har_builder")
    shutil.copytree(data_dir, tmp_path / "data")
    shutil.copytree(data_dir, tmp_path / "other")
    tfds_dir = tmp_path / "tfds"
    copies = tfds_dir / "har_kaggle"

    def new_version(colour):
        Image.new("RGB", (60, 50), colour).save(tmp_path / "data" / "train" / "Image_1.jpg")
        return prepare("data", image_size=32, tfds_dir=tfds_dir, progress=False)

    first = prepare("data", image_size=32, tfds_dir=tfds_dir, progress=False)  # a relative path
    assert first.info.metadata["source"] == str(tmp_path / "data")
    images_array(first, "train", progress=False)
    # Kept: the same folder at another size, another folder at this size.
    kept = [
        prepare("data", image_size=24, tfds_dir=tfds_dir, progress=False),
        prepare(tmp_path / "other", image_size=32, tfds_dir=tfds_dir, progress=False),
    ]
    second = new_version((0, 255, 0))
    assert not Path(first.data_dir).exists()
    # A build of the second copy's array file in progress (its temporary file is fresh) and
    # what an interrupted removal left: the first is kept, the second removed.
    building = Path(second.data_dir) / ".har_kaggle-train.images-0.npy.0.tmp"
    building.write_bytes(b"")
    (copies / f"32px-0{_REMOVING}0" / "1.0.0").mkdir(parents=True)
    third = new_version((0, 0, 255))
    assert Path(second.data_dir).exists()
    assert not [p for p in os.listdir(copies) if _REMOVING in p]
    # Once that build is long over, the next copy removes both older ones.
    os.utime(building, (time.time() - 3600,) * 2)
    # Copies named before places (<S>px-<fingerprint>) go by the folder their metadata names.
    shutil.copytree(Path(third.data_dir).parent, copies / "32px-01d")
    shutil.copytree(Path(kept[1].data_dir).parent, copies / "32px-0ther")
    fourth = new_version((255, 0, 0))
    assert sorted(p.name for p in copies.glob("*px-*")) == sorted(
        [*(Path(b.data_dir).parent.name for b in [*kept, fourth]), "32px-0ther"]
    )
    np.testing.assert_array_equal(
        images_array(fourth, "train", progress=False)[
            [f for f, _ in fourth.info.metadata["stored"]["train"]].index("Image_1.jpg")
        ],
        _reference(tmp_path / "data" / "train" / "Image_1.jpg", 32),
    )
    removed = [m.split()[1].rstrip(",") for m in caplog.messages if m.startswith("removed ")]
    name = {b: Path(b.data_dir).parent.name for b in (first, second, third)}
    assert removed[0] == name[first]
    assert sorted(removed[1:]) == sorted([name[second], name[third], "32px-01d"])


def test_what_killed_preparations_left_is_removed_once_abandoned(data_dir, tmp_path):
    """tfds builds into <copy>/incomplete.<random>_1.0.0/; a kill (out of memory) leaves it."""
    from har_flax.data.har_builder import _ABANDONED_BUILD_SECONDS, remove_stale_copies

    shutil.copytree(data_dir, tmp_path / "data")
    tfds_dir = tmp_path / "tfds"
    first = prepare(tmp_path / "data", image_size=32, tfds_dir=tfds_dir, progress=False)
    copy = Path(first.data_dir).parent
    long_ago = time.time() - _ABANDONED_BUILD_SECONDS - 60

    def leftover(folder, fresh=False):
        shard = folder / "har_kaggle-test.array_record-00000-of-00001"
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b"x" * 100)
        if not fresh:
            for p in (shard, shard.parent):
                os.utime(p, (long_ago, long_ago))
        return shard.parent

    # In the copy in use: an abandoned build goes, one written lately (another run's) stays.
    old, ongoing = (
        leftover(copy / "incomplete.AAA_1.0.0"),
        leftover(copy / "incomplete.BBB_1.0.0", fresh=True),
    )
    # A copy of this folder whose preparation never finished: it goes whole.
    never = copy.with_name(copy.name.replace(copy.name.split("-")[1], "0never"))
    leftover(never / "incomplete.CCC_1.0.0")
    remove_stale_copies(first)
    assert not old.exists() and ongoing.exists() and not never.exists()
    assert HarKaggle(data_dir=os.fspath(tfds_dir), config=first.builder_config).is_prepared()

    # Once the folder changes, the old copy goes with what builds left in it.
    leftover(copy / "incomplete.DDD_1.0.0")
    Image.new("RGB", (60, 50), (9, 99, 9)).save(tmp_path / "data" / "train" / "Image_1.jpg")
    second = prepare(tmp_path / "data", image_size=32, tfds_dir=tfds_dir, progress=False)
    assert not copy.exists() and Path(second.data_dir).exists()
