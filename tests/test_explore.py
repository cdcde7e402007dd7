"""har-explore: the report finds injected anomalies and gets counts and sizes right."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from har_flax.cli import explore as explore_cli
from har_flax.data.explore import explore, write_report
from har_flax.data.synthetic import write_synthetic_kaggle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A synthetic set (3 HAR classes x 4) with one of each anomaly injected."""
    root = write_synthetic_kaggle(
        tmp_path_factory.mktemp("messy") / "data", train_per_class=4, test_count=3,
        min_size=32, max_size=64, seed=11,
    )  # fmt: skip
    lines = (root / "Training_set.csv").read_text().splitlines()
    lines += [
        lines[1],  # line 14: duplicate of line 2
        "Image_20.jpg,calling",  # line 15: missing file
        "Image_21.jpg,",  # line 16: empty label
        "Image_22.jpg,jumping",  # line 17: not a HAR action (and a single image)
    ]
    (root / "Training_set.csv").write_text("\n".join(lines) + "\n")
    Image.new("RGB", (50, 30), (1, 2, 3)).save(root / "train/Image_22.jpg")
    Image.new("RGB", (50, 30), (1, 2, 3)).save(root / "train/Image_21.jpg")
    (root / "train/Image_4.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (40, 40)).save(root / "train/stray.png")
    (root / "Testing_set.csv").write_text("file\nImage_1.jpg\n")  # wrong column
    return root


def test_report_lists_every_injected_anomaly(messy):
    report = explore(messy, workers=2)
    assert not report["ok"]
    by_kind = {}
    for a in report["anomalies"]:
        by_kind.setdefault(a["kind"], []).append((a["filename"], a["line"]))
    assert by_kind["duplicate_row"] == [("Image_1.jpg", 14)]
    assert by_kind["missing_file"] == [("Image_20.jpg", 15)]
    assert by_kind["empty_label"] == [("Image_21.jpg", 16)]
    assert by_kind["unknown_label"] == [("Image_22.jpg", 17)]
    assert by_kind["singleton_label"] == [("Image_22.jpg", 17)]
    assert by_kind["unreadable_image"] == [("Image_4.jpg", 5)]
    assert report["anomaly_counts"]["duplicate_row"] == 1
    [structural] = report["structural_errors"]
    assert structural["file"] == "Testing_set.csv" and "lacks ['filename']" in structural["message"]
    assert report["csv"]["train"]["rows"] == 16 and report["csv"]["train"]["columns"] == [
        "filename", "label",
    ]  # fmt: skip
    train = report["images"]["train"]
    assert train["missing"] == ["Image_20.jpg"]
    assert [u["filename"] for u in train["unreadable"]] == ["Image_4.jpg"]
    assert train["unlisted_files"] == ["stray.png"]
    assert report["classes"]["looks_like_har"]


def test_class_counts_and_size_statistics_are_exact(messy):
    report = explore(messy, workers=1)
    rows = [line.split(",") for line in (messy / "Training_set.csv").read_text().splitlines()[1:]]
    good = {f: lab for f, lab in rows[:12]}  # the synthetic rows, before injection
    expected = {c: list(good.values()).count(c) for c in ("calling", "clapping", "cycling")}
    expected["calling"] += 1  # Image_20: listed, though its file is missing
    expected["jumping"] = 1
    assert report["classes"]["counts"] == expected
    # Sizes of every readable image of a good row (Image_4 is corrupt), read independently.
    names = [f for f in good if f != "Image_4.jpg"] + ["Image_22.jpg"]
    sizes = [Image.open(messy / "train" / f).size for f in names]
    assert report["sizes"]["count"] == len(sizes)  # no test images: Testing_set.csv is broken
    w = np.array([s[0] for s in sizes])
    aspect = np.array([s[0] / s[1] for s in sizes])
    assert report["sizes"]["width"]["min"] == w.min()
    assert report["sizes"]["width"]["max"] == w.max()
    assert report["sizes"]["width"]["median"] == pytest.approx(np.median(w))
    assert report["sizes"]["aspect"]["mean"] == pytest.approx(aspect.mean())
    assert report["sizes"]["formats"] == {"JPEG": len(sizes)}


def test_written_files(messy, tmp_path):
    report = explore(messy)
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == report
    md = paths["markdown"].read_text()
    assert "Training_set.csv line 14: duplicate of line 2 (Image_1.jpg)" in md
    assert "train/Image_20.jpg does not exist" in md
    assert "| jumping | 1 |" in md
    assert "stray.png" in md
    with Image.open(paths["chart"]) as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "explore.json",
        "explore.md",
        "explore.png",
    ]  # fmt: skip  (atomic writes leave no temporary files)


def test_clean_set_is_ok(tmp_path):
    root = write_synthetic_kaggle(tmp_path, train_per_class=2, test_count=2, min_size=32,
                                  max_size=40)  # fmt: skip
    report = explore(root)
    assert report["ok"] and report["anomalies"] == [] and report["structural_errors"] == []
    assert report["images"]["test"]["readable"] == 2


def test_a_single_class_is_what_stops_training(tmp_path):
    root = write_synthetic_kaggle(tmp_path, classes=("calling", "clapping"), train_per_class=2,
                                  test_count=1, min_size=32, max_size=40)  # fmt: skip
    csv_path = root / "Training_set.csv"
    csv_path.write_text(csv_path.read_text().replace(",clapping", ",calling"))
    report = explore(root)
    assert not report["ok"]
    [error] = report["structural_errors"]
    assert error["kind"] == "too_few_classes" and "found ['calling']" in error["message"]


def test_script_subprocess(messy, tmp_path):
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "scripts/explore.py", "--data-dir", str(messy), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "anomalies" in run.stdout and "Testing_set.csv" in run.stdout
    assert json.loads((out / "explore.json").read_text())["classes"]["count"] == 4
    strict = subprocess.run(
        [sys.executable, "scripts/explore.py", "--data-dir", str(messy), "--out", str(out),
         "--strict"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert strict.returncode == 1
    bad = subprocess.run(
        [sys.executable, "scripts/explore.py", "--data-dir", str(tmp_path / "nope"), "--out",
         str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "train_csv, message",
    [
        ("filename,label\n", "Training_set.csv has a header but no rows"),
        ("file,label\nImage_1.jpg,calling\n", "Training_set.csv has columns ['file', 'label']"),
        ("", "Training_set.csv is empty"),
    ],
)
def test_broken_training_csv_is_counted_and_named(tmp_path, capsys, train_csv, message):
    root = tmp_path / "data"
    for folder in ("train", "test"):
        (root / folder).mkdir(parents=True)
    (root / "Training_set.csv").write_text(train_csv)
    (root / "Testing_set.csv").write_text("filename\n")
    report = explore(root, workers=1)
    [err] = report["structural_errors"]
    assert err["message"].startswith(str(root / "Training_set.csv")), err  # the file, named
    assert message in err["message"]
    assert report["anomaly_counts"] == {"bad_csv": 1} and not report["ok"]

    assert explore_cli.main(["--data-dir", str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 anomalies (bad_csv: 1)" in out and "(none)" not in out
    assert f"  {root / 'Training_set.csv'}" in out
    md = (tmp_path / "out" / "explore.md").read_text()
    assert "**1 anomalies found.**" in md and message in md


def test_out_that_is_a_file_is_refused_up_front(messy, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    for out, says in (
        (tmp_path / "afile", "exists and is not a directory: name a directory"),
        (tmp_path / "afile" / "sub", "cannot be made; name another directory"),
    ):
        with pytest.raises(SystemExit) as e:
            explore_cli.main(["--data-dir", str(messy), "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --out {out}" in err and says in err, err
    assert (tmp_path / "afile").read_text() == "keep"


def _kaggle_set(root):
    return write_synthetic_kaggle(root, train_per_class=4, test_count=3, min_size=32,
                                  max_size=48, seed=9)  # fmt: skip


def test_a_file_name_that_is_not_utf8_is_reported_and_the_report_written_whole(tmp_path, capsys):
    root = _kaggle_set(tmp_path / "data")
    # A Latin-1 name an old zip tool left: no CSV can list it, as CSVs are read as UTF-8.
    raw = os.fsencode(root / "train") + b"/caf\xe9.jpg"
    try:
        with open(raw, "wb") as f:
            Image.new("RGB", (40, 40)).save(f, format="JPEG")
    except OSError as e:  # A file system that only takes UTF-8 names (macOS, some mounts).
        pytest.skip(f"cannot make a file with a non-UTF-8 name here: {e}")
    out = tmp_path / "out"
    assert explore_cli.main(["--data-dir", str(root), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["explore.json", "explore.md", "explore.png"]
    report = json.loads((out / "explore.json").read_text(encoding="utf-8"))
    [bad] = [a for a in report["anomalies"] if a["kind"] == "bad_filename"]
    assert bad["split"] == "train" and bad["filename"] == "caf\ufffd.jpg"
    assert "not UTF-8" in bad["message"] and "rename it" in bad["message"]
    assert report["images"]["train"]["unlisted_files"] == ["caf\ufffd.jpg"]
    assert report["anomaly_counts"] == {"bad_filename": 1} and not report["ok"]
    md = (out / "explore.md").read_text(encoding="utf-8")
    assert "caf\ufffd.jpg" in md and "bad_filename" in md
    with Image.open(out / "explore.png") as im:
        assert im.format == "PNG"
    capsys.readouterr()
    assert explore_cli.main(["--data-dir", str(root), "--out", str(out), "--strict"]) == 1


@pytest.mark.parametrize(
    "test_csv",
    [None, b"", b"\xef\xbb\xbf\r\n"],
    ids=["absent", "0 bytes", "BOM and a line break"],
)
def test_no_or_a_blank_testing_csv_is_no_test_split_not_an_anomaly(tmp_path, capsys, test_csv):
    root = _kaggle_set(tmp_path / "data")
    (root / "Testing_set.csv").unlink()
    if test_csv is not None:
        (root / "Testing_set.csv").write_bytes(test_csv)
    report = explore(root, workers=1)
    assert report["ok"], report["anomalies"] + report["structural_errors"]
    assert report["structural_errors"] == [] and report["anomaly_counts"] == {}
    note = report["csv"]["test"]["note"]
    assert note.startswith(str(root / "Testing_set.csv")) and "no test split" in note
    assert report["notes"] == [note]
    assert report["images"]["test"]["listed"] == 0
    out = tmp_path / "out"
    assert explore_cli.main(["--data-dir", str(root), "--out", str(out), "--strict"]) == 0
    assert "no test split" in (out / "explore.md").read_text()


def test_training_csv_absent_stays_a_structural_error(tmp_path):
    root = _kaggle_set(tmp_path / "data")
    (root / "Training_set.csv").unlink()
    (root / "Testing_set.csv").unlink()
    report = explore(root, workers=1)
    [err] = report["structural_errors"]
    assert err["kind"] == "bad_csv" and err["file"] == "Training_set.csv"
    assert "not found" in err["message"] and not report["ok"]
    assert "note" in report["csv"]["test"] and "error" not in report["csv"]["test"]


def _exif_rotated_jpeg(path, size, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.new("RGB", size, (200, 10, 10)).save(path, exif=exif.tobytes())


def test_sizes_are_as_training_sees_them_after_exif_orientation(tmp_path):
    root = _kaggle_set(tmp_path / "data")
    _exif_rotated_jpeg(root / "train/Image_1.jpg", (80, 60), 6)  # a phone photo held upright
    _exif_rotated_jpeg(root / "train/Image_2.jpg", (90, 50), 3)  # upside down: no swap
    with Image.open(root / "train/Image_1.jpg") as im:
        assert im.size == (80, 60)  # what the header says
    report = explore(root, workers=1)
    assert report["ok"]
    # The reference: every image made upright by Pillow's own EXIF transpose.
    upright = []
    for split in ("train", "test"):
        for p in sorted((root / split).iterdir()):
            with Image.open(p) as im:
                upright.append(ImageOps.exif_transpose(im).size)
    assert (60, 80) in upright and (80, 60) not in upright
    sz = report["sizes"]
    assert sz["count"] == len(upright)
    for key, values in (
        ("width", [w for w, _ in upright]),
        ("height", [h for _, h in upright]),
        ("aspect", [w / h for w, h in upright]),
    ):
        assert sz[key]["min"] == pytest.approx(min(values)), key
        assert sz[key]["max"] == pytest.approx(max(values)), key
        assert sz[key]["mean"] == pytest.approx(np.mean(values)), key
    assert {"width": 60, "height": 80, "count": 1} in sz["common_sizes"]
    md = write_report(report, tmp_path / "out")["markdown"].read_text()
    [row] = [line for line in md.splitlines() if line.startswith("| height px |")]
    assert row.endswith(f"| {max(h for _, h in upright):.2f} |")  # 80: the rotated photo


def test_unreadable_images_are_left_out_of_the_statistics(tmp_path):
    root = _kaggle_set(tmp_path / "data")
    # A TIFF (Pillow opens it, the project refuses it) and a JPEG cut short after its header.
    Image.new("RGB", (200, 100)).save(root / "train/Image_1.jpg", format="TIFF")
    buf = io.BytesIO()
    Image.effect_noise((150, 90), 60).convert("RGB").save(buf, format="JPEG", quality=95)
    (root / "train/Image_2.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    report = explore(root, workers=1)
    unreadable = report["images"]["train"]["unreadable"]
    assert sorted(u["filename"] for u in unreadable) == ["Image_1.jpg", "Image_2.jpg"]
    readable = report["images"]["train"]["readable"] + report["images"]["test"]["readable"]
    assert readable == 12 + 3 - 2
    sz = report["sizes"]
    assert sz["count"] == readable
    assert sz["formats"] == {"JPEG": readable} and sz["modes"] == {"RGB": readable}
    assert sz["width"]["max"] <= 48 and sz["height"]["max"] <= 48  # not 200x100 nor 150x90
    assert sum(x["count"] for x in sz["common_sizes"]) <= readable
    assert sz["histograms"]["width"]["counts"] and sum(sz["histograms"]["width"]["counts"]) == (
        readable
    )
