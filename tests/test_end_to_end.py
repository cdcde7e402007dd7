"""The user's path on a CPU: explore -> train -> checkpoint -> evaluate -> the Predictor classifies.

Synthetic images in the exact Kaggle layout (3 classes, chance = 1/3), the ``smoke`` config
(README's CPU smoke run), the console-script entry points called in process. The accuracy bar
is far above chance: with 60 validation images, guessing reaches it with probability below
1e-4.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from har_flax.cli import evaluate as evaluate_cli
from har_flax.cli import train as train_cli
from har_flax.data.synthetic import TEST_LABELS_CSV, render_image, write_synthetic_kaggle

TRAIN_PER_CLASS = 100  # 240 train / 60 validation images after the 20% stratified split
BAR = 0.8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = write_synthetic_kaggle(root / "data", train_per_class=TRAIN_PER_CLASS, test_count=12)
    work, reports = root / "work", root / "reports"
    # README's smoke run: the smoke preset (tiny for 30 epochs, from random initialisation).
    args = ["--data-dir", str(data), "--workdir", str(work), "--config", "smoke", "--no-progress"]
    assert train_cli.main(args) == 0
    return data, work, reports, args


def test_explore_reports_the_data(run):
    explore_cli = pytest.importorskip("har_flax.cli.explore")
    data, _, reports, _ = run
    assert explore_cli.main(["--data-dir", str(data), "--out", str(reports / "explore")]) == 0
    report = json.loads((reports / "explore" / "explore.json").read_text())
    assert report["classes"]["count"] == 3


def test_training_learned_and_wrote_its_workdir(run, capsys):
    _, work, _, args = run
    history = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    best = max(r["val_accuracy"] for r in history)
    assert best >= BAR, [round(r["val_accuracy"], 3) for r in history]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("config.json", "split.json", "curves.png", "model/labels.json"):
        assert (work / name).exists(), name
    # The same command again resumes from the latest checkpoint: here, a finished run.
    assert train_cli.main(args) == 0
    assert "best validation accuracy" in capsys.readouterr().out
    assert len((work / "metrics.jsonl").read_text().splitlines()) == len(history)


def test_evaluate_reproduces_the_validation_accuracy(run):
    data, work, reports, _ = run
    out = reports / "eval"
    args = ["--workdir", str(work), "--data-dir", str(data), "--out", str(out)]
    assert evaluate_cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    labels = json.loads((work / "model" / "labels.json").read_text())
    # The exported best model, re-read from disk, scores what training measured for it.
    assert report["model"]["accuracy"] == pytest.approx(labels["val_accuracy"])
    assert report["model"]["accuracy"] >= BAR
    assert "linear_probe" in report and report["linear_probe"]["metrics"]["num_examples"] > 0
    # The submission against the hidden test labels the generator keeps.
    with open(out / "submission.csv", newline="") as f:
        predicted = {r["filename"]: r["label"] for r in csv.DictReader(f)}
    with open(data / TEST_LABELS_CSV, newline="") as f:
        truth = {r["filename"]: r["label"] for r in csv.DictReader(f)}
    assert predicted.keys() == truth.keys()
    test_acc = np.mean([predicted[k] == truth[k] for k in truth])
    assert test_acc >= 0.6, test_acc  # 12 images: 8 right by chance has p < 0.02


def test_predictor_classifies_held_out_images(run):
    from har_flax.predictor import Predictor

    _, work, _, _ = run
    predictor = Predictor.load(work / "model", warmup=False)
    classes = ("calling", "clapping", "cycling")
    rng = np.random.default_rng(12345)  # images the run never saw
    right = 0
    for i in range(30):
        buf = io.BytesIO()
        Image.fromarray(render_image(i % 3, rng)).save(buf, format="JPEG", quality=90)
        prediction = predictor.predict([buf.getvalue()])
        assert [c for c, _ in sorted(prediction)] == sorted(classes)
        assert sum(p for _, p in prediction) == pytest.approx(1.0, abs=1e-4)
        right += prediction[0][0] == classes[i % 3]
    # The model scores ~0.8 on validation; 18 of 30 right by chance (1/3 each) has p < 0.001.
    assert right >= 18, right
