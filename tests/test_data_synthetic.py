"""The synthetic generator: the exact Kaggle layout, deterministic, classes learnable."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image

from har_flax.data.synthetic import TEST_LABELS_CSV, write_synthetic_kaggle

CLASSES = ("calling", "clapping", "cycling")


def _rows(path):
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_kaggle(
        tmp_path_factory.mktemp("syn"), classes=CLASSES, train_per_class=8, test_count=7,
        min_size=40, max_size=90, seed=3,
    )  # fmt: skip


def test_layout_is_kaggles(synthetic):
    assert sorted(p.name for p in synthetic.iterdir()) == sorted(
        ["Testing_set.csv", "Training_set.csv", TEST_LABELS_CSV, "test", "train"]
    )
    assert (synthetic / "Training_set.csv").read_text().splitlines()[0] == "filename,label"
    assert (synthetic / "Testing_set.csv").read_text().splitlines()[0] == "filename"
    train = _rows(synthetic / "Training_set.csv")[1:]
    test = _rows(synthetic / "Testing_set.csv")[1:]
    hidden = _rows(synthetic / TEST_LABELS_CSV)
    # Image_1 .. Image_N in each folder, CSV order, nothing else on disk.
    assert [r[0] for r in train] == [f"Image_{i}.jpg" for i in range(1, 25)]
    assert [r[0] for r in test] == [f"Image_{i}.jpg" for i in range(1, 8)]
    assert all(len(r) == 1 for r in test)
    assert sorted(p.name for p in (synthetic / "train").iterdir()) == sorted(r[0] for r in train)
    assert sorted(p.name for p in (synthetic / "test").iterdir()) == sorted(r[0] for r in test)
    # Balanced classes, interleaved (not one block per class).
    labels = [r[1] for r in train]
    assert {c: labels.count(c) for c in CLASSES} == {c: 8 for c in CLASSES}
    assert labels != sorted(labels)
    assert hidden[0] == ["filename", "label"]
    assert [r[0] for r in hidden[1:]] == [r[0] for r in test]
    assert {r[1] for r in hidden[1:]} <= set(CLASSES)


def test_images_are_jpegs_of_varied_size(synthetic):
    sizes = []
    for path in sorted((synthetic / "train").iterdir()) + sorted((synthetic / "test").iterdir()):
        assert re.fullmatch(r"Image_\d+\.jpg", path.name)
        with Image.open(path) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            sizes.append(im.size)
    w, h = np.array(sizes).T
    assert w.min() >= 40 and h.min() >= 40 and w.max() <= 90 and h.max() <= 90
    aspects = w / h
    assert aspects.min() < 0.9 and aspects.max() > 1.1  # portrait and landscape both present
    assert len(set(sizes)) > len(sizes) // 2


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = write_synthetic_kaggle(tmp_path / "a", train_per_class=2, test_count=2, seed=5)
    b = write_synthetic_kaggle(tmp_path / "b", train_per_class=2, test_count=2, seed=5)
    c = write_synthetic_kaggle(tmp_path / "c", train_per_class=2, test_count=2, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train/Image_1.jpg").read_bytes() != (c / "train/Image_1.jpg").read_bytes()


def test_classes_are_learnable_but_not_from_mean_colour(tmp_path):
    from sklearn.linear_model import LogisticRegression

    root = write_synthetic_kaggle(tmp_path, train_per_class=30, test_count=45, seed=1)

    def load(csv_name, folder):
        rows = _rows(root / csv_name)[1:]
        x = np.stack([
            np.asarray(Image.open(root / folder / f).convert("RGB").resize((16, 16)))
            for f, _ in rows
        ])  # fmt: skip
        return x.astype(np.float32) / 255.0, np.array([CLASSES.index(lab) for _, lab in rows])

    xt, yt = load("Training_set.csv", "train")
    xv, yv = load(TEST_LABELS_CSV, "test")
    pixels = LogisticRegression(max_iter=500).fit(xt.reshape(len(xt), -1), yt)
    colour = LogisticRegression(max_iter=500).fit(xt.mean(axis=(1, 2)), yt)
    assert pixels.score(xv.reshape(len(xv), -1), yv) >= 0.9
    assert colour.score(xv.mean(axis=(1, 2)), yv) <= 0.6  # chance is 1/3


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="two distinct"):
        write_synthetic_kaggle(tmp_path, classes=("a", "a"))
    with pytest.raises(ValueError, match="min_size"):
        write_synthetic_kaggle(tmp_path, min_size=100, max_size=50)
