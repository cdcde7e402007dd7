"""Evaluation: numpy metrics against scikit-learn, the linear probe, the written report."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

from har_flax import evaluate as ev
from har_flax.checkpoint import CheckpointError, save_model
from har_flax.config import override, tiny
from har_flax.data import load_splits
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


def test_evaluate_writes_report_and_submission(tmp_path):
    """A model directory (untrained: the report's plumbing is under test) on synthetic data."""
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=8, test_count=5)
    work = tmp_path / "work"
    config = override(tiny(), {"train.batch_size": 8})
    splits = load_splits(data, work, image_size=32, data_config=config.data)
    variables = init_variables(config.model, jax.random.key(1))
    save_model(work / "model", config=config, classes=splits.classes, variables=variables,
               metadata={"version": "test-1"})  # fmt: skip

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
    # The baseline: ImageNet features of the same split, 1280-d.
    assert "1280-d" in report["linear_probe"]["description"]
    assert report["linear_probe"]["metrics"]["num_examples"] == len(splits.val)
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
    assert (data / TEST_LABELS_CSV).exists()


def test_evaluate_without_model_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ev.evaluate(tmp_path / "nowhere", None, tmp_path / "r", splits=object())
