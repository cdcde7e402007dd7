"""The validation split: stratified, deterministic, persisted in the work directory."""

from __future__ import annotations

import collections
import json
import logging

import pytest

from har_flax.config import DataConfig
from har_flax.data import DataError, load_splits
from har_flax.data.split import SPLIT_FILE, load_or_create_split, stratified_split
from har_flax.data.synthetic import write_synthetic_kaggle

# 10 + 7 + 3 images in three classes.
FILES = [f"Image_{i}.jpg" for i in range(1, 21)]
LABELS = ["a"] * 10 + ["b"] * 7 + ["c"] * 3


def test_stratified_per_class_counts():
    train, val = stratified_split(FILES, LABELS, fraction=0.3, seed=0)
    assert sorted(train + val) == sorted(FILES) and not set(train) & set(val)
    label = dict(zip(FILES, LABELS, strict=True))
    # round(n * 0.3) per class: a 3, b 2, c 1 (never 0 nor n).
    assert collections.Counter(label[f] for f in val) == {"a": 3, "b": 2, "c": 1}
    assert collections.Counter(label[f] for f in train) == {"a": 7, "b": 5, "c": 2}
    # Rounded to the nearest, not truncated: 7 * 0.4 = 2.8 holds out 3 of b.
    _, val = stratified_split(FILES, LABELS, fraction=0.4, seed=0)
    assert collections.Counter(label[f] for f in val) == {"a": 4, "b": 3, "c": 1}
    # Tiny classes keep one image on each side.
    _, val = stratified_split(["x", "y", "z", "w"], ["p", "p", "q", "q"], fraction=0.1, seed=0)
    assert len(val) == 2


def test_deterministic_and_independent_of_row_order():
    a = stratified_split(FILES, LABELS, fraction=0.3, seed=7)
    assert a == stratified_split(FILES, LABELS, fraction=0.3, seed=7)
    shuffled = list(zip(FILES, LABELS, strict=True))[::-1]
    assert a == stratified_split([f for f, _ in shuffled], [c for _, c in shuffled],
                                 fraction=0.3, seed=7)  # fmt: skip
    assert a != stratified_split(FILES, LABELS, fraction=0.3, seed=8)


def test_names_equal_as_numbers_split_the_same_in_any_row_order():
    # Image_1.jpg and Image_01.jpg sort as equals by their numbers; the name breaks the tie.
    files = ["Image_1.jpg", "Image_01.jpg", "Image_2.jpg", "Image_02.jpg", "IMG_1\u00b22.jpg"]
    labels = ["a"] * 5
    for seed in range(4):
        a = stratified_split(files, labels, fraction=0.4, seed=seed)
        assert a == stratified_split(files[::-1], labels, fraction=0.4, seed=seed)


def test_single_image_label_cannot_be_stratified():
    with pytest.raises(DataError, match=r"'c' \(Image_3.jpg\)"):
        stratified_split(FILES[:3], ["a", "a", "c"], fraction=0.3, seed=0)


def test_persisted_and_checked(tmp_path):
    train, val = load_or_create_split(tmp_path, FILES, LABELS, fraction=0.3, seed=1)
    saved = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert (saved["seed"], saved["val_fraction"], saved["classes"]) == (1, 0.3, ["a", "b", "c"])
    assert (saved["train"], saved["val"]) == (train, val)

    # Resume: read back, not recomputed (an edited file is what comes back).
    saved["train"], saved["val"] = saved["train"][1:], saved["val"] + saved["train"][:1]
    (tmp_path / SPLIT_FILE).write_text(json.dumps(saved))
    assert load_or_create_split(tmp_path, FILES, LABELS, fraction=0.3, seed=1) == (
        saved["train"], saved["val"],
    )  # fmt: skip

    with pytest.raises(DataError, match="split_seed=1, val_fraction=0.3 but the config says "
                                        "split_seed=2"):  # fmt: skip
        load_or_create_split(tmp_path, FILES, LABELS, fraction=0.3, seed=2)
    with pytest.raises(DataError, match=r"1 images of the data are not in the split.*Image_21"):
        load_or_create_split(tmp_path, FILES + ["Image_21.jpg"], LABELS + ["a"], fraction=0.3,
                             seed=1)  # fmt: skip
    with pytest.raises(DataError, match=r"1 split images are not in the data.*Image_20"):
        load_or_create_split(tmp_path, FILES[:-1], LABELS[:-1], fraction=0.3, seed=1)
    (tmp_path / SPLIT_FILE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_or_create_split(tmp_path, FILES, LABELS, fraction=0.3, seed=1)


def test_a_split_file_with_an_image_on_both_sides_is_refused(tmp_path):
    # An edited split.json would leak that validation image into training.
    load_or_create_split(tmp_path, FILES, LABELS, fraction=0.3, seed=1)
    saved = json.loads((tmp_path / SPLIT_FILE).read_text())
    saved["train"].append(saved["val"][0])
    (tmp_path / SPLIT_FILE).write_text(json.dumps(saved))
    for evaluating in (False, True):
        with pytest.raises(DataError, match="puts some images in both train and val"):
            load_or_create_split(tmp_path, FILES, LABELS, fraction=0.3, seed=1,
                                 evaluating=evaluating)  # fmt: skip


def test_load_splits_reuses_the_workdir_split(tmp_path):
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=6, test_count=0, seed=4)
    config = DataConfig(val_fraction=0.5, split_seed=3)
    first = load_splits(data, tmp_path / "run", image_size=32, data_config=config)
    assert collections.Counter(first.val.labels.tolist()) == {0: 3, 1: 3, 2: 3}
    assert len(first.test) == 0
    again = load_splits(data, tmp_path / "run", image_size=32, data_config=config)
    assert (again.train.filenames, again.val.filenames) == (first.train.filenames,
                                                            first.val.filenames)  # fmt: skip
    with pytest.raises(DataError, match="split_seed=3"):
        load_splits(data, tmp_path / "run", image_size=32,
                    data_config=DataConfig(val_fraction=0.5, split_seed=4))  # fmt: skip
    other = load_splits(data, tmp_path / "other", image_size=32,
                        data_config=DataConfig(val_fraction=0.5, split_seed=4))  # fmt: skip
    assert other.val.filenames != first.val.filenames


def test_a_resumed_run_refuses_changed_labels_and_warns_of_changed_images(tmp_path, caplog):
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=6, test_count=0, seed=4)
    config = DataConfig(val_fraction=0.5, split_seed=3)
    load_splits(data, tmp_path / "run", image_size=32, data_config=config)
    # An image re-saved (other bytes): the run goes on with it, and says so.
    image = data / "train" / "Image_5.jpg"
    image.write_bytes((data / "train" / "Image_10.jpg").read_bytes())
    with caplog.at_level(logging.WARNING, logger="har_flax.data.split"):
        load_splits(data, tmp_path / "run", image_size=32, data_config=config)
    assert "the image files changed since this run started" in caplog.text
    # A relabelled image: the run would be neither the old nor a new one.
    csv_path = data / "Training_set.csv"
    rows = csv_path.read_text().splitlines()
    name, label = rows[1].split(",")
    other = next(r.split(",")[1] for r in rows[2:] if r.split(",")[1] != label)
    csv_path.write_text("\n".join([rows[0], f"{name},{other}", *rows[2:]]) + "\n")
    with pytest.raises(DataError, match=rf"1 images have another label than when this run "
                       rf"started \(e.g. {name} \({label} -> {other}\)\)"):  # fmt: skip
        load_splits(data, tmp_path / "run", image_size=32, data_config=config)
    # Evaluation may follow corrected labels.
    load_splits(data, tmp_path / "run", image_size=32, data_config=config, evaluating=True)
