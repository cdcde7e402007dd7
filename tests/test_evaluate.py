"""Evaluation: numpy metrics against scikit-learn, the linear probe, the written report."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

from har_flax import evaluate as ev
from har_flax.checkpoint import CheckpointError, save_model
from har_flax.cli import evaluate as cli_evaluate
from har_flax.config import override, tiny
from har_flax.data import ArraySource, DataError, load_splits
from har_flax.data.synthetic import TEST_LABELS_CSV, write_synthetic_kaggle
from har_flax.models import init_variables

CLASSES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def fixed_predictions():
    """Imbalanced labels, a class never predicted (d) and a class never present but predicted."""
    rng = np.random.default_rng(3)
    y_true = rng.choice(3, size=200, p=[0.6, 0.3, 0.1])  # class d (3) never occurs
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    y_pred[y_pred == 2] = np.where(rng.random((y_pred == 2).sum()) < 0.5, 2, 3)
    return y_true, y_pred


# The fixed predictions include a class absent from the truth on purpose; sklearn warns of it.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
def test_metrics_match_sklearn(fixed_predictions):
    y_true, y_pred = fixed_predictions
    labels = list(range(len(CLASSES)))
    m = ev.classification_metrics(y_true, y_pred, CLASSES)

    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(
        m["confusion_matrix"], skm.confusion_matrix(y_true, y_pred, labels=labels)
    )
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(CLASSES):
        got = m["per_class"][name]
        assert got["precision"] == pytest.approx(p[i])
        assert got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f[i])
        assert got["support"] == s[i]
    # Per-class accuracy: the class's share classified correctly (the confusion matrix's rows).
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    present = cm.sum(axis=1) > 0
    np.testing.assert_allclose(
        [m["per_class"][n]["accuracy"] for n in np.array(CLASSES)[present]],
        cm.diagonal()[present] / cm.sum(axis=1)[present],
    )
    report = skm.classification_report(
        y_true, y_pred, labels=labels, output_dict=True, zero_division=0
    )
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        assert m[ours]["precision"] == pytest.approx(report[theirs]["precision"])
        assert m[ours]["recall"] == pytest.approx(report[theirs]["recall"])
        assert m[ours]["f1"] == pytest.approx(report[theirs]["f1-score"])
    json.dumps(m)  # JSON-able as is


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="3 true labels but 2 predictions"):
        ev.classification_metrics([0, 1, 2], [0, 1], CLASSES)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        ev.classification_metrics([0, 1], [0, 7], CLASSES)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):  # K itself is one past
        ev.classification_metrics([0, 4], [0, 1], CLASSES)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
def test_markdown_and_heat_map_show_the_metrics_they_are_given(fixed_predictions):
    """Every number of report.md comes from the right entry of the metrics: the summary rows,
    the per-class table and the confusion matrix with true classes as rows."""
    y_true, y_pred = fixed_predictions
    report = _fixed_report(fixed_predictions)
    m, probe = report["model"], report["linear_probe"]["metrics"]
    rows = {}
    for line in ev.to_markdown(report).splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows.setdefault(cells[0], cells[1:])
    for name, get in (("accuracy", lambda r: r["accuracy"]),
                      ("balanced accuracy", lambda r: r["balanced_accuracy"]),
                      ("macro F1", lambda r: r["macro_avg"]["f1"]),
                      ("weighted F1", lambda r: r["weighted_avg"]["f1"])):  # fmt: skip
        assert rows[name] == [f"{get(m):.4f}", f"{get(probe):.4f}"], name
    assert m["macro_avg"]["f1"] != pytest.approx(m["weighted_avg"]["f1"], abs=1e-3)
    for name in CLASSES:
        r = m["per_class"][name]
        want = [f"{r[k]:.4f}" for k in ("precision", "recall", "f1", "accuracy")]
        assert rows[name][:4] == want and rows[name][4] == str(r["support"])
        # The confusion matrix's row of this class: true `name`, counts per predicted class.
        i = CLASSES.index(name)
        matrix_row = [int(v) for v in _md_matrix_row(report, name)]
        assert matrix_row == np.asarray(m["confusion_matrix"])[i].tolist()
    assert not np.array_equal(m["confusion_matrix"], np.asarray(m["confusion_matrix"]).T)
    # The heat map's colours: each true class's row of rates sums to 1 (0 for an absent class).
    rates = ev.row_rates(m["confusion_matrix"])
    np.testing.assert_allclose(rates.sum(axis=1), [1, 1, 1, 0])
    np.testing.assert_allclose(rates[1], np.asarray(m["confusion_matrix"])[1] / (y_true == 1).sum())


def _fixed_report(fixed_predictions):
    """A report of the fixed predictions, with a probe that always predicts class 0."""
    y_true, y_pred = fixed_predictions
    m = ev.classification_metrics(y_true, y_pred, CLASSES)
    probe = ev.classification_metrics(y_true, np.zeros_like(y_pred), CLASSES)
    return {"model_dir": "m", "split": "validation", "model": m,
            "linear_probe": {"description": "probe", "metrics": probe},
            "fine_tuning_gain": m["accuracy"] - probe["accuracy"]}  # fmt: skip


def _md_matrix_row(report, name):
    lines = ev.to_markdown(report).splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("## Confusion matrix"))
    row = next(x for x in lines[start:] if x.startswith(f"| **{name}** |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_linear_probe_matches_sklearn_logistic_regression():
    # Overlapping Gaussian classes: the probe must do as well as sklearn's solver on held-out data.
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.0, (3, 20))
    y = rng.integers(0, 3, 600)
    x = centres[y] + rng.normal(0, 1.6, (600, 20)) + 5.0  # offset: the probe must standardise
    tr, te = slice(0, 400), slice(400, None)
    probe = ev.fit_linear_probe(x[tr], y[tr], 3)
    ours = np.mean(probe.logits(x[te]).argmax(1) == y[te])
    ref = LogisticRegression(max_iter=2000).fit(x[tr], y[tr]).score(x[te], y[te])
    assert ref > 0.6  # the task is neither trivial nor hopeless
    assert ours >= ref - 0.03, (ours, ref)
    assert ours > 0.6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic data and a saved model (untrained: the report's plumbing is under test)."""
    root = tmp_path_factory.mktemp("run")
    data = write_synthetic_kaggle(root / "data", train_per_class=8, test_count=5)
    work = root / "work"
    config = override(tiny(), {"train.batch_size": 8})
    splits = load_splits(data, work, image_size=32, data_config=config.data)
    variables = init_variables(config.model, jax.random.key(1))
    save_model(work / "model", config=config, classes=splits.classes, variables=variables,
               metadata={"version": "test-1"})  # fmt: skip
    return types.SimpleNamespace(data=data, work=work, config=config, splits=splits)


def copy_of_run(run, tmp_path):
    """A copy of the run's data and split to break, and har-evaluate's flags for it."""
    data, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(run.data, data)
    work.mkdir()
    shutil.copy(run.work / "split.json", work)
    argv = ["--workdir", str(work), "--data-dir", str(data), "--model", str(run.work / "model"),
            "--probe", "none", "--out", str(tmp_path / "report")]  # fmt: skip
    return data, work, argv


def test_evaluate_writes_report_and_submission(run, tmp_path):
    data, work, splits = run.data, run.work, run.splits
    out = tmp_path / "report"
    report = ev.evaluate(work, data, out, probe="tflite")

    for name in ("report.json", "report.md", "confusion_matrix.png", "per_class.png"):
        assert (out / name).stat().st_size > 100, name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    m = report["model"]
    assert m["num_examples"] == len(splits.val)
    assert sum(sum(row) for row in m["confusion_matrix"]) == len(splits.val)
    assert report["model_version"] == "test-1"
    # The baseline: ImageNet features of the same split, 1280-d, fitted on the training part.
    assert "1280-d" in report["linear_probe"]["description"]
    assert report["linear_probe"]["metrics"]["num_examples"] == len(splits.val)
    assert report["linear_probe"]["train_examples"] == len(splits.train) != len(splits.val)
    assert report["fine_tuning_gain"] == pytest.approx(
        m["accuracy"] - report["linear_probe"]["metrics"]["accuracy"]
    )
    md = (out / "report.md").read_text()
    assert "| calling |" in md and "linear probe" in md

    # Kaggle shape: the Testing_set.csv filenames in order, each with a known class.
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(data / "Testing_set.csv", newline="") as f:
        expected = [r[0] for r in csv.reader(f)][1:]
    assert rows[0] == ["filename", "label"]
    assert [r[0] for r in rows[1:]] == expected
    assert {r[1] for r in rows[1:]} <= set(splits.classes)
    # Each label is what the served model answers for that image file (the Predictor decodes
    # and resizes as the data pipeline does).
    from har_flax.predictor import Predictor

    predictor = Predictor.load(work / "model", batch_sizes=(1,), warmup=False)
    for filename, label in rows[1:]:
        [(best, _), *_] = predictor.predict([(data / "test" / filename).read_bytes()])
        assert label == best, filename
    assert (data / TEST_LABELS_CSV).exists()
    assert report["submission"] == {
        "file": "submission.csv", "rows": 5, "testing_set_rows": 5, "missing": [],
    }  # fmt: skip
    assert report["skipped"] == [] and "Warning" not in md and "Skipped" not in md
    # Atomic writes: the five files and no temporary one.
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png", "per_class.png", "report.json", "report.md", "submission.csv",
    ]  # fmt: skip


def test_evaluate_without_model_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ev.evaluate(tmp_path / "nowhere", None, tmp_path / "r", splits=object())


# --- A failure leaves the previous report; paths are checked before any work ---------------------

OLD_REPORT = {
    "report.json": b'{"old": true}\n',
    "report.md": b"# old model\n",
    "confusion_matrix.png": b"old png",
    "per_class.png": b"old png",
    "submission.csv": b"filename,label\nImage_1.jpg,old\n",
}


def _old_report(out):
    out.mkdir(parents=True, exist_ok=True)
    for name, data in OLD_REPORT.items():
        (out / name).write_bytes(data)


def _assert_old_report(out):
    assert {p.name: p.read_bytes() for p in out.iterdir()} == OLD_REPORT


def test_failure_after_inference_leaves_the_previous_report(run, tmp_path, monkeypatch):
    out = tmp_path / "report"
    _old_report(out)

    def broken(metrics):
        raise RuntimeError("plotting failed")

    # The last thing made before writing: everything else (submission included) is computed.
    monkeypatch.setattr(ev, "per_class_png", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        ev.evaluate(run.work, run.data, out, splits=run.splits, probe="none")
    _assert_old_report(out)


def test_a_disk_full_while_writing_leaves_the_previous_report_whole(fixed_predictions, tmp_path):
    """A write that fails part-way (here a file-size limit: EFBIG, as ENOSPC would) must not
    leave a report half new: the new report.json beside the old submission.csv."""
    report = _fixed_report(fixed_predictions)
    new = tmp_path / "new"
    ev.write_report(report, new, submission="filename,label\nImage_1.jpg,new\n")
    sizes = {p.name: p.stat().st_size for p in new.iterdir()}
    limit = max(sizes["report.json"], sizes["report.md"], sizes["submission.csv"]) + 100
    assert sizes["confusion_matrix.png"] > limit  # so that one cannot be written
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "report"
    _old_report(out)
    code = f"""
import json, resource, signal, sys
from har_flax import evaluate as ev
report = json.load(open({str(tmp_path / "report.json")!r}))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    ev.write_report(report, {str(out)!r}, submission="filename,label\\nImage_1.jpg,new\\n")
except OSError as e:
    print("failed:", e.strerror)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.stdout.strip() == "failed: File too large", proc.stdout + proc.stderr
    _assert_old_report(out)  # every file the old one, and no temporary file left


def test_bad_probe_fails_before_inference(run, tmp_path, monkeypatch):
    out = tmp_path / "report"
    _old_report(out)
    (tmp_path / "junk.h5").write_bytes(b"not HDF5")

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before the probe was checked")

    monkeypatch.setattr(ev, "predict_logits", no_inference)
    with pytest.raises(ValueError, match="junk.h5"):
        ev.evaluate(run.work, run.data, out, splits=run.splits, probe=str(tmp_path / "junk.h5"))
    _assert_old_report(out)


def test_report_without_test_images_removes_a_stale_submission(run, tmp_path):
    out = tmp_path / "report"
    _old_report(out)
    no_test = _without_test(run.splits)
    report = ev.evaluate(run.work, None, out, splits=no_test, probe="none")
    assert report["submission"] is None
    assert not (out / "submission.csv").exists()  # it was another model's
    assert "No test images, so no submission file." in (out / "report.md").read_text()


def test_an_empty_testing_set_csv_means_no_submission_as_in_training(run, tmp_path):
    # An empty spreadsheet export ("CSV UTF-8": a byte-order mark and a line break): training
    # takes it for no test split, and so does the report, after inference as before it.
    data = tmp_path / "data"
    shutil.copytree(run.data, data)
    (data / "Testing_set.csv").write_bytes(b"\xef\xbb\xbf\r\n")
    report = ev.evaluate(run.work, data, tmp_path / "report", splits=_without_test(run.splits),
                         probe="none")  # fmt: skip
    assert report["submission"] is None
    assert not (tmp_path / "report" / "submission.csv").exists()


def _without_test(splits):
    empty = ArraySource(np.zeros((0, 32, 32, 3), np.uint8), [], [], np.zeros(0, np.int32), 32)
    return dataclasses.replace(splits, test=empty)


@pytest.mark.parametrize(
    "flags, flag, message",
    [
        (["--probe", "/nonexistent.h5"], "--probe", "no such file or directory"),
        (["--out", "{file}"], "--out", "exists and is not a directory: name a directory"),
        (["--out", "{file}/sub"], "--out", "cannot be made; name another directory"),
        (["--download-dir", "{file}"], "--download-dir", "exists and is not a directory"),
        (["--model", "{tmp}/nomodel"], "--model", "is not a directory"),
    ],
)
def test_cli_checks_flags_before_any_work(tmp_path, capsys, flags, flag, message):
    work, data, out = tmp_path / "work", tmp_path / "data", tmp_path / "report"
    work.mkdir()
    data.mkdir()
    _old_report(out)
    (tmp_path / "afile").write_text("a file")
    flags = [f.format(file=tmp_path / "afile", tmp=tmp_path) for f in flags]
    argv = ["--workdir", str(work), "--data-dir", str(data), "--out", str(out), *flags]
    with pytest.raises(SystemExit) as e:
        cli_evaluate.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag} " in err and message in err, err
    assert list(work.iterdir()) == []  # no data prepared, no split written
    _assert_old_report(out)
    assert (tmp_path / "afile").read_text() == "a file"


# --- Bad data: an error naming the flag, or skipped and listed -----------------------------------


def test_bad_test_images_are_skipped_listed_and_missing_rows_flagged(run, tmp_path, capsys):
    data, work, argv = copy_of_run(run, tmp_path)
    (data / "test" / "Image_2.jpg").write_bytes(b"not an image")

    # har-train's hint (the library's) names its setting ...
    with pytest.raises(DataError, match="set data.skip_bad_images=true"):
        load_splits(data, work, image_size=32, data_config=run.config.data, progress=False,
                    evaluating=True)  # fmt: skip
    # ... har-evaluate's names its flag, which has no --set.
    assert cli_evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert "test/Image_2.jpg is unreadable" in err and "rerun with --skip-bad-images" in err
    assert "data.skip_bad_images=true" not in err
    assert not (tmp_path / "report").exists()

    assert cli_evaluate.main([*argv, "--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad rows or images (--skip-bad-images)" in err
    assert "\n  Testing_set.csv line 3: test/Image_2.jpg is unreadable" in err
    assert "warning: 1 of the 5 Testing_set.csv rows have no row in submission.csv" in err
    assert "Missing: Image_2.jpg" in err

    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    [skipped] = report["skipped"]
    assert skipped["file"] == "Image_2.jpg" and "unreadable" in skipped["reason"]
    assert report["submission"] == {
        "file": "submission.csv", "rows": 4, "testing_set_rows": 5, "missing": ["Image_2.jpg"],
    }  # fmt: skip
    with open(out / "submission.csv", newline="") as f:
        submitted = [r[0] for r in csv.reader(f)][1:]
    with open(data / "Testing_set.csv", newline="") as f:
        listed = [r[0] for r in csv.reader(f)][1:]
    assert submitted == [f for f in listed if f != "Image_2.jpg"]  # no label made up
    md = (out / "report.md").read_text()
    assert "## Skipped rows and images (1)" in md and "test/Image_2.jpg is unreadable" in md
    assert "**Warning: 1 of the 5 Testing_set.csv rows have no row in the submission**" in md
    assert "Kaggle expects one row per Testing_set.csv row. Missing: `Image_2.jpg`." in md


def test_a_training_image_gone_bad_after_training_is_skipped_not_resplit(run, tmp_path, capsys):
    """The split is the run's: an image that broke later is left out, never a reason to re-split."""
    data, work, argv = copy_of_run(run, tmp_path)
    bad = run.splits.val.filenames[0]
    (data / "train" / bad).write_bytes(b"truncated")

    assert cli_evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert f"train/{bad} is unreadable" in err and "rerun with --skip-bad-images" in err

    assert cli_evaluate.main([*argv, "--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad rows or images (--skip-bad-images)" in err and bad in err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["model"]["num_examples"] == len(run.splits.val) - 1
    assert [s["file"] for s in report["skipped"]] == [bad]
    # The run's split is unchanged on disk: nothing was re-split.
    assert (work / "split.json").read_bytes() == (run.work / "split.json").read_bytes()


def test_split_mismatch_in_evaluation_points_to_the_models_data(run, tmp_path, capsys):
    data, work, argv = copy_of_run(run, tmp_path)
    gone = run.splits.train.filenames[0]
    lines = (data / "Training_set.csv").read_text().splitlines(keepends=True)
    kept = [x for x in lines if not x.startswith(gone + ",")]
    (data / "Training_set.csv").write_text("".join(kept))

    assert cli_evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 split images are not in the data" in err and gone in err
    assert "evaluation must use the split the model was trained with" in err
    assert "delete" not in err  # a new split would put training images in validation
    # Training on the same data is told how to start over.
    with pytest.raises(DataError, match="delete .*split.json to split again"):
        load_splits(data, work, image_size=32, data_config=run.config.data, progress=False)
