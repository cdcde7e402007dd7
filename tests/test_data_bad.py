"""Bad data: each fault is an error naming CSV line and file, or skipped and listed on request."""

from __future__ import annotations

import csv
import re
import shutil

import pytest
from PIL import Image

from har_flax.config import DataConfig
from har_flax.data import DataError, load_splits
from har_flax.data.synthetic import write_synthetic_kaggle

SKIP = DataConfig(skip_bad_images=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # 3 classes x 4 images: lines 2..13 of Training_set.csv; 3 test images.
    return write_synthetic_kaggle(
        tmp_path_factory.mktemp("base") / "data", train_per_class=4, test_count=3,
        min_size=32, max_size=48, seed=9,
    )  # fmt: skip


@pytest.fixture
def data(base, tmp_path):
    shutil.copytree(base, tmp_path / "data")
    return tmp_path / "data"


def _read(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _write(path, rows):
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _edit_train(data, fn):
    rows = _read(data / "Training_set.csv")
    _write(data / "Training_set.csv", fn(rows))


def _label(data, filename):
    return dict(_read(data / "Training_set.csv")[1:])[filename]


def _other_label(data, filename):
    mine = _label(data, filename)
    return next(r[1] for r in _read(data / "Training_set.csv")[1:] if r[1] != mine)


def missing_file(data):
    (data / "train/Image_2.jpg").unlink()
    return "Image_2.jpg", r"Training_set.csv line 3: train/Image_2.jpg does not exist"


def corrupt_jpeg(data):
    path = data / "train/Image_3.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "Image_3.jpg", r"Training_set.csv line 4: train/Image_3.jpg is unreadable: truncated"


def not_an_image(data):
    (data / "test/Image_1.jpg").write_text("hello")
    return "Image_1.jpg", r"Testing_set.csv line 2: test/Image_1.jpg is unreadable: text"


def duplicate_row(data):
    _edit_train(data, lambda rows: rows + [rows[1]])
    return "Image_1.jpg", r"Training_set.csv line 14: duplicate of line 2 \(Image_1.jpg\)"


def conflicting_labels(data):
    other = _other_label(data, "Image_1.jpg")
    _edit_train(data, lambda rows: rows + [["Image_1.jpg", other]])
    return "Image_1.jpg", r"line 2: Image_1.jpg has conflicting labels"


def empty_label(data):
    _edit_train(data, lambda rows: [r if r[0] != "Image_5.jpg" else [r[0], ""] for r in rows])
    return "Image_5.jpg", r"Training_set.csv line 6: Image_5.jpg has an empty label"


def misspelt_label(data):
    wrong = _label(data, "Image_6.jpg").upper()
    _edit_train(data, lambda rows: [r if r[0] != "Image_6.jpg" else [r[0], wrong] for r in rows])
    return "Image_6.jpg", rf"line 7: label '{wrong}' of Image_6.jpg looks like a misspelling"


def single_image_label(data):
    Image.new("RGB", (40, 40), (9, 9, 9)).save(data / "train/Image_13.jpg")
    _edit_train(data, lambda rows: rows + [["Image_13.jpg", "dancing"]])
    return "Image_13.jpg", r"label 'dancing' has a single image \(Image_13.jpg\)"


def path_as_filename(data):
    _edit_train(data, lambda rows: rows + [["../Training_set.csv", "x"]])
    return "../Training_set.csv", r"line 14: '../Training_set.csv' is not a plain file name"


def malformed_row(data):
    _edit_train(data, lambda rows: rows + [["Image_1.jpg", "a", "b"]])
    return None, r"Training_set.csv line 14: 3 fields for 2 columns"


ROW_FAULTS = [
    missing_file, corrupt_jpeg, not_an_image, duplicate_row, conflicting_labels, empty_label,
    misspelt_label, single_image_label, path_as_filename, malformed_row,
]  # fmt: skip


@pytest.mark.parametrize("fault", ROW_FAULTS, ids=lambda f: f.__name__)
def test_row_fault_is_an_error_or_skipped_and_listed(fault, data, tmp_path):
    filename, message = fault(data)
    # The test split's faults stop evaluation only: training never reads that split.
    evaluating = fault is not_an_image
    with pytest.raises(DataError, match=message) as e:
        load_splits(data, tmp_path / "strict", image_size=32, data_config=DataConfig(),
                    evaluating=evaluating)  # fmt: skip
    assert "skip_bad_images" in str(e.value)  # says how to go on

    splits = load_splits(data, tmp_path / "lenient", image_size=32, data_config=SKIP)
    listed = [(f, reason) for f, reason in splits.skipped if (f == filename or filename is None)]
    assert any(re.search(message, reason) for _, reason in listed), splits.skipped
    kept = set(splits.train.filenames) | set(splits.val.filenames) | set(splits.test.filenames)
    if fault in (duplicate_row,):
        assert filename in kept  # the first copy stays
    elif fault is not_an_image:
        assert filename not in splits.test.filenames
    elif filename is not None:
        assert filename not in set(splits.train.filenames) | set(splits.val.filenames)
    assert set(splits.classes) == {"calling", "clapping", "cycling"}
    # Every kept image is still readable by index.
    images, _ = splits.train.get_batch(range(len(splits.train)))
    assert len(images) == len(splits.train)


def test_every_kind_of_problem_is_listed_in_one_error(data, tmp_path):
    """A bad row, an unreadable training image and an unreadable test image: one run, one list."""
    missing_file(data)
    corrupt_jpeg(data)
    single_image_label(data)  # found in the CSV, but listed with the rest: one run, not two
    (data / "test" / "Image_1.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig(), evaluating=True)
    message = str(e.value)
    assert message.startswith("4 bad rows or images:"), message
    for part in ("Training_set.csv line 3: train/Image_2.jpg does not exist",
                 "Training_set.csv line 14: label 'dancing' has a single image (Image_13.jpg)",
                 "train/Image_3.jpg is unreadable", "test/Image_1.jpg is unreadable"):  # fmt: skip
        assert part in message, message
    # Training: the same three training problems stop it; the test image, which training does
    # not read, is named after them.
    with pytest.raises(DataError, match=r"^3 bad rows or images:") as e:
        load_splits(data, tmp_path / "t", image_size=32, data_config=DataConfig())
    message = str(e.value)
    also = message.index("\nAlso 1 in the test split, which training does not read")
    assert message.index("test/Image_1.jpg is unreadable") > also, message
    assert message.count("Image_1.jpg") == 1, message


def test_test_split_problems_do_not_stop_training(data, tmp_path):
    (data / "test" / "Image_1.jpg").write_bytes(b"")
    splits = load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    assert splits.skipped == []  # nothing was skipped by data.skip_bad_images
    [(name, reason)] = splits.test_skipped
    assert name == "Image_1.jpg" and "test/Image_1.jpg is unreadable" in reason
    assert len(splits.train) + len(splits.val) == 12 and len(splits.test) == 2
    # The same prepared copy, for evaluation: an error naming the image.
    with pytest.raises(DataError, match="test/Image_1.jpg is unreadable"):
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig(), evaluating=True)


def test_a_test_split_without_one_readable_image_does_not_stop_training(data, tmp_path):
    for image in (data / "test").iterdir():
        image.write_bytes(b"")
    splits = load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    assert len(splits.test) == 0 and len(splits.train) + len(splits.val) == 12
    assert sorted(name for name, _ in splits.test_skipped) == [f"Image_{i}.jpg" for i in (1, 2, 3)]
    with pytest.raises(DataError, match=r"3 bad rows or images:(.|\n)*test/Image_3.jpg is unread"):
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig(), evaluating=True)


def test_no_readable_training_image_is_an_error_even_when_skipping(data, tmp_path):
    for image in (data / "train").iterdir():
        image.write_bytes(b"not a JPEG")
    with pytest.raises(
        DataError,
        match=r"none of the 12 rows of .*Training_set.csv names a readable image:\n"
        r"  Training_set.csv line 2: train/Image_1.jpg is unr",
    ):
        load_splits(data, tmp_path / "a", image_size=32, data_config=SKIP)
    # No train/ folder at all: the rows' missing files are listed, before any decoding.
    shutil.rmtree(data / "train")
    with pytest.raises(
        DataError,
        match=r"need at least two classes with images, found \[\]; its faulty rows:\n"
        r"  Training_set.csv line 2: train/Image_1.jpg does not exist",
    ):
        load_splits(data, tmp_path / "b", image_size=32, data_config=SKIP)


def test_fewer_than_two_classes_is_said_before_any_image_is_decoded(data, tmp_path):
    keep = _label(data, "Image_1.jpg")
    _edit_train(data, lambda rows: [r for r in rows if r[1] in ("label", keep)])
    corrupt_jpeg(data)  # not reported: the classes are wrong whatever the images hold
    for config in (DataConfig(), SKIP):
        with pytest.raises(DataError, match=rf"need at least two classes with images, found "
                           rf"\['{keep}'\]$"):  # fmt: skip
            load_splits(data, tmp_path, image_size=32, data_config=config)
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))


def test_an_image_name_that_is_not_utf8_does_not_stop_preparing(data, tmp_path):
    """A stray file with a Latin-1 name (from an old zip) in train/, listed by no CSV."""
    import os

    shutil.copy(data / "train/Image_1.jpg", os.fsencode(data / "train") + b"/caf\xe9.jpg")
    splits = load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    assert len(splits.train) + len(splits.val) == 12


def test_spreadsheet_csv_dialects_read_as_meant(data, tmp_path):
    """A blank line before the header, the header in capitals, `"x", "y"` quoting."""
    rows = _read(data / "Training_set.csv")
    text = "\nFilename,Label\n" + "".join(f'"{f}", "{label}"\n' for f, label in rows[1:])
    (data / "Training_set.csv").write_text(text)
    (data / "Testing_set.csv").write_text("")  # empty: no test split, as if absent
    (data / "train/Image_3.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"line 5: train/Image_3.jpg is unreadable: the file is "
                       r"empty \(0 bytes\)"):  # line numbers are the file's  # fmt: skip
        load_splits(data, tmp_path / "a", image_size=32, data_config=DataConfig())
    splits = load_splits(data, tmp_path / "b", image_size=32, data_config=SKIP)
    assert set(splits.classes) == {"calling", "clapping", "cycling"}  # no quotes in the names
    assert len(splits.test) == 0


def test_a_quoted_field_over_several_lines_keeps_the_line_numbers_the_files(data, tmp_path):
    """A note column may hold a line break; the rows after it keep their file line numbers."""
    rows = _read(data / "Training_set.csv")
    text = "filename,label,note\n" + f'{rows[1][0]},{rows[1][1]},"two\nlines"\n'
    text += "".join(f"{f},{label},\n" for f, label in rows[2:])
    (data / "Training_set.csv").write_text(text)
    (data / "train/Image_3.jpg").write_bytes(b"")  # the CSV's row 3, on file line 5
    with pytest.raises(DataError, match=r"^1 bad rows or images:\n  Training_set.csv line 5: "
                       r"train/Image_3.jpg is unreadable"):  # fmt: skip
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig())


def test_csv_columns_are_found_by_header_name_in_any_order(data, tmp_path):
    """`label,filename` (or an extra column first) reads each image with its own label."""
    rows = _read(data / "Training_set.csv")
    label_of = dict(rows[1:])
    header = ["Label", "source", "Filename"]
    _write(data / "Training_set.csv", [header] + [[lbl, "phone", f] for f, lbl in rows[1:]])
    splits = load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    for source in (splits.train, splits.val):
        got = {f: splits.classes[y] for f, y in zip(source.filenames, source.labels, strict=True)}
        assert got == {f: label_of[f] for f in source.filenames}
    assert sorted(splits.train.filenames + splits.val.filenames) == sorted(label_of)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("filename,label\nImage_1.jpg,calling\nImage_2.jpg,caf\xe9\n".encode("latin-1"),
         r"line 3 is not UTF-8 \(byte 0xe9; Latin-1 .*save it as UTF-8 \(in Excel: CSV UTF-8\)"),
        ("filename,label\n".encode("utf-16"), r"is UTF-16 text; save it as UTF-8"),
    ],
    ids=["latin1", "utf16"],
)  # fmt: skip
def test_a_csv_in_another_encoding_names_the_line_and_the_remedy(data, tmp_path, content, message):
    (data / "Training_set.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig())


def test_a_missing_file_names_what_is_there_instead(data, tmp_path):
    (data / "train/Image_1.jpg").rename(data / "train/Image_1.JPG")
    (data / "train/Image_2.jpg").unlink()
    (data / "train/Image_2.jpg").mkdir()
    (data / "train/nested").mkdir()
    (data / "train/Image_4.jpg").rename(data / "train/nested/Image_4.jpg")
    _edit_train(data, lambda rows: [*rows, ["Cafe\u0301_1.jpg", rows[1][1]]])  # NFD in the CSV
    shutil.copy(data / "train/Image_5.jpg", data / "train/Caf\u00e9_1.jpg")  # NFC on disk
    with pytest.raises(DataError) as e:
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    message = str(e.value)
    for part in (
        "train/Image_1.jpg does not exist, but train/Image_1.JPG does",
        "train/Image_2.jpg is a directory, not an image file",
        "train/Image_4.jpg does not exist, but train/nested/Image_4.jpg does",
        "train/Cafe\u0301_1.jpg does not exist, but train/Caf\u00e9_1.jpg does",
    ):
        assert part in message, message


def test_large_local_images_are_training_data_not_uploads(data, tmp_path):
    """48 megapixels is over the server's 40 M per frame, not over what training reads."""
    Image.new("RGB", (8000, 6000), (200, 30, 30)).save(data / "train/Image_1.jpg", quality=50)
    splits = load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    assert "Image_1.jpg" in set(splits.train.filenames) | set(splits.val.filenames)


def test_prepared_with_skipping_is_still_an_error_without_it(data, tmp_path):
    corrupt_jpeg(data)
    (data / "test" / "Image_1.jpg").write_bytes(b"")
    load_splits(data, tmp_path / "a", image_size=32, data_config=SKIP,
                download_dir=tmp_path / "tfds")  # fmt: skip
    with pytest.raises(DataError, match="train/Image_3.jpg is unreadable") as e:
        load_splits(data, tmp_path / "b", image_size=32, data_config=DataConfig(),
                    download_dir=tmp_path / "tfds")  # fmt: skip
    message = str(e.value)
    assert message.startswith("1 bad rows or images:"), message
    assert "Also 1 in the test split" in message and "test/Image_1.jpg" in message, message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"Training_set.csv is empty; it needs a header line: filename,label"),
        ("filename,label\n", r"Training_set.csv has a header but no rows"),
        ("file,class\nImage_1.jpg,calling\n", r"lacks \['filename', 'label'\]"),
        # A stray quote would read every later row into one label: the line that opens it.
        (
            'filename,label\nImage_1.jpg,calling\nImage_2.jpg,"calling\nImage_3.jpg,calling\n',
            r"Training_set.csv line 3: the quote opened on this line is not closed",
        ),
        # ... and past the csv module's field limit (128 KiB: ~7,000 of the 12,600 rows).
        (
            'filename,label\nImage_1.jpg,"calling\n' + "Image_2.jpg,calling\n" * 8000,
            r"Training_set.csv line 2: cannot read this row \(field larger than field limit",
        ),
    ],
    ids=["empty", "header_only", "wrong_columns", "unclosed_quote", "unclosed_quote_large"],
)
def test_structural_faults_are_errors_even_when_skipping(content, message, data, tmp_path):
    (data / "Training_set.csv").write_text(content)
    for config in (DataConfig(), SKIP):
        with pytest.raises(DataError, match=message):
            load_splits(data, tmp_path, image_size=32, data_config=config)


def test_missing_layout(data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nowhere", tmp_path, image_size=32, data_config=DataConfig())
    (data / "Training_set.csv").unlink()
    with pytest.raises(DataError, match=r"Training_set.csv not found. Expected the Kaggle"):
        load_splits(data, tmp_path, image_size=32, data_config=DataConfig())


def test_a_layout_one_folder_down_is_named(data, tmp_path):
    # What unzipping the Kaggle archive gives: the layout inside "Human Action Recognition/".
    unzipped = tmp_path / "har"
    unzipped.mkdir()
    inner = data.rename(unzipped / "Human Action Recognition")
    hint = re.escape(f"Training_set.csv is in '{inner}': use that folder as the data directory")
    with pytest.raises(DataError, match=hint):
        load_splits(unzipped, tmp_path / "w", image_size=32, data_config=DataConfig())
    with pytest.raises(DataError, match=hint):  # two levels down
        load_splits(tmp_path, tmp_path / "w", image_size=32, data_config=DataConfig())
    assert len(load_splits(inner, tmp_path / "w", image_size=32, data_config=DataConfig()).train)


@pytest.mark.parametrize(
    "content", [None, b"", b"\xef\xbb\xbf\r\n"], ids=["absent", "empty", "bom"]
)
def test_without_testing_set_the_test_split_is_empty(content, data, tmp_path):
    # An empty file (from a spreadsheet: a byte-order mark and a line break) is no file.
    if content is None:
        (data / "Testing_set.csv").unlink()
    else:
        (data / "Testing_set.csv").write_bytes(content)
    splits = load_splits(data, tmp_path, image_size=32, data_config=DataConfig())
    assert len(splits.test) == 0 and len(splits.train) + len(splits.val) == 12
