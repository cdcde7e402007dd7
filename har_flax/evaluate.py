"""Evaluation: metrics on the validation split, a Kaggle submission and a linear-probe baseline.

The metric code is plain numpy (scikit-learn is only the tests' reference). The baseline is a
multinomial logistic regression, fitted in JAX, on the pooled features of the frozen ImageNet
MobileNetV2 over the same split, so a report shows what fine-tuning bought.
Shape legend: N examples, B batch, T frames, H W C image, D features, K classes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from har_flax import sharding
from har_flax.checkpoint import atomic_write_files, load_model
from har_flax.config import Config, ModelConfig
from har_flax.data import kaggle
from har_flax.models import create_model, init_variables
from har_flax.models.cnn_lstm import normalize_uint8
from har_flax.models.mobilenet_v2 import MobileNetV2
from har_flax.train import MODEL_DIR, predict_logits

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_PNG = "per_class.png"
SUBMISSION_CSV = "submission.csv"
# Long lists are cut in report.md (report.json has them all).
_MD_LIST = 50


# --- Metrics -------------------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (K, K): row = true class, column = predicted class."""
    y_true, y_pred = _check_labels(y_true, y_pred, num_classes)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/accuracy/support, macro and weighted averages.

    Conventions (those of scikit-learn with ``zero_division=0``): a class never predicted has
    precision 0; a class with no examples has recall 0; F1 is 0 when precision + recall is 0.
    Per-class accuracy is the fraction of that class's examples classified correctly (so it
    equals its recall; their mean is the balanced accuracy).

    Args:
      y_true: int (N,) true class indices.
      y_pred: int (N,) predicted class indices.
      classes: the K class names, index i = class i.

    Returns:
      A JSON-able dict: ``accuracy``, ``balanced_accuracy``, ``num_examples``, ``per_class``
      ({name: {precision, recall, f1, accuracy, support}}), ``macro_avg`` and ``weighted_avg``
      ({precision, recall, f1}), ``confusion_matrix`` (K x K lists) and ``classes``.
    """
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true examples per class
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = int(cm.sum())
    weights = support / max(n, 1)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "accuracy": float(recall[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "classes": list(classes),
        "num_examples": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if n else 0.0,
        "per_class": per_class,
        "macro_avg": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        },
        "weighted_avg": {
            "precision": float((precision * weights).sum()),
            "recall": float((recall * weights).sum()),
            "f1": float((f1 * weights).sum()),
        },
        "confusion_matrix": cm.tolist(),
    }


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _check_labels(y_true, y_pred, k: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape[0]} true labels but {y_pred.shape[0]} predictions")
    for name, y in (("true labels", y_true), ("predictions", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"{name} must be class indices in [0, {k}), got {y.min()}..{y.max()}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


# --- Linear probe --------------------------------------------------------------------------------


class PooledBackbone(nn.Module):
    """MobileNetV2 pooled features, averaged over frames: uint8 (B, T, H, W, 3) -> (B, D)."""

    width: float = 1.0

    @nn.compact
    def __call__(self, frames: jax.Array, train: bool = False) -> jax.Array:
        b, t = frames.shape[:2]
        x = normalize_uint8(frames, jnp.float32).reshape(b * t, *frames.shape[2:])  # (B*T, H, W, 3)
        feats = MobileNetV2(width=self.width, name="backbone")(x, train)  # (B*T, D)
        return feats.reshape(b, t, -1).mean(axis=1)  # (B, D)


def imagenet_backbone_variables(source: str = "tflite", image_size: int = 224) -> dict:
    """``{"params": {"backbone": ...}, "batch_stats": {"backbone": ...}}`` of the ImageNet model."""
    from har_flax.weights import load_pretrained_backbone

    cfg = ModelConfig(num_classes=2, width=1.0, image_size=image_size, pretrained="none")
    variables = load_pretrained_backbone(init_variables(cfg, jax.random.key(0)), source)
    return {c: {"backbone": variables[c]["backbone"]} for c in ("params", "batch_stats")}


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""

    weights: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    num_examples: int  # N it was fitted on

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32 (N, K) for float (N, D) features."""
        z = (np.asarray(features, np.float32) - self.mean) / self.scale
        return z @ self.weights + self.bias


def fit_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    l2: float = 1e-3,
    steps: int = 500,
    learning_rate: float = 0.05,
) -> LinearProbe:
    """Fits softmax regression with an L2 penalty by full-batch Adam (a convex problem).

    Args:
      features: float (N, D).
      labels: int (N,) in [0, K).
      num_classes: K.
      l2: penalty on the mean squared weight (times D), against separable-data blow-up.
      steps: optimiser steps.
      learning_rate: Adam's rate.

    Returns:
      The fitted :class:`LinearProbe`.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"features must be (N, D) with N = {len(labels)}, got {x.shape}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6  # Constant features (dead ReLUs) stay finite.
    z = jnp.asarray((x - mean) / scale)
    y = jax.nn.one_hot(jnp.asarray(labels), num_classes)
    params = {
        "w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    tx = optax.adam(learning_rate)

    def loss_fn(p):
        logits = z @ p["w"] + p["b"]  # (N, K)
        return optax.softmax_cross_entropy(logits, y).mean() + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def run(p):
        def step(carry, _):
            p, s = carry
            grads = jax.grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return p

    p = jax.device_get(run(params))
    return LinearProbe(np.asarray(p["w"]), np.asarray(p["b"]), mean, scale, len(x))


# --- The report ----------------------------------------------------------------------------------


def evaluate(
    workdir: str | Path,
    data_dir: str | Path | None,
    out_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    splits: Any = None,
    download_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    probe: str = "tflite",
) -> dict[str, Any]:
    """Evaluates the best model of a run and writes the report.

    Writes to ``out_dir``: ``report.json``, ``report.md``, ``confusion_matrix.png``,
    ``per_class.png`` and ``submission.csv`` (Kaggle's ``filename,label`` for
    ``Testing_set.csv``), each atomically and only once all of them are computed, so a
    failure leaves a previous report as it was. The probe's weights are loaded before any
    inference, so a bad ``probe`` fails at once.

    Args:
      workdir: the training run W (its ``split.json`` fixes the validation split).
      data_dir: the Kaggle-layout data (may be None when ``splits`` is given; when given, its
        ``Testing_set.csv`` is read to name the rows the submission lacks).
      out_dir: R.
      model_dir: the model directory to evaluate (default ``W/model``, the best one).
      splits: already loaded splits (as from ``har_flax.data.load_splits``).
      download_dir: the prepared copies of ``data_dir`` (default ``W/tfds``; the training
        run's ``download_dir`` if it had one, so they are not prepared again).
      progress: show progress bars while the data is prepared.
      batch_size: inference batch (default: the run's training batch size).
      probe: backbone weights of the linear-probe baseline: "tflite" (bundled ImageNet weights),
        a ``har-port-weights`` directory or weight file, or "none" to leave the baseline out.

    Returns:
      The report (what ``report.json`` holds). ``skipped`` lists the rows and images the data
      loading left out (``data.skip_bad_images``); ``submission.missing`` names the
      ``Testing_set.csv`` rows without a prediction (skipped as bad rows or unreadable images;
      no label is made up for them).
    """
    workdir, out_dir = Path(workdir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else workdir / MODEL_DIR
    config, labels_json, variables = load_model(model_dir)
    classes = tuple(labels_json["classes"])
    # Before any inference: a missing or unfit weight file must not cost a whole evaluation.
    probe_variables = (
        imagenet_backbone_variables(probe, config.model.image_size) if probe != "none" else None
    )
    if splits is None:
        if data_dir is None:
            raise ValueError("evaluate needs data_dir or splits")
        from har_flax.data import load_splits

        splits = load_splits(
            data_dir,
            workdir,
            image_size=config.model.image_size,
            data_config=config.data,
            download_dir=download_dir,
            progress=progress,
            evaluating=True,
        )
    if tuple(splits.classes) != classes:
        raise ValueError(
            f"the data's classes {list(splits.classes)} differ from the model's {list(classes)}"
        )
    mesh = sharding.make_mesh()
    batch_size = batch_size or config.train.batch_size
    model = create_model(config.model)
    frames = config.model.num_frames

    val_labels = np.asarray(splits.val.labels)
    val_logits = predict_logits(model, variables, splits.val, batch_size, mesh, frames)
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "model_version": labels_json.get("version"),
        "config": config.to_dict(),
        "split": "validation",
        "model": classification_metrics(val_labels, val_logits.argmax(axis=1), classes),
        "skipped": [{"file": f, "reason": r} for f, r in splits.skipped],
    }

    submission = None
    names: list[str] = []
    if len(splits.test):
        test_logits = predict_logits(model, variables, splits.test, batch_size, mesh, frames)
        names = [classes[i] for i in test_logits.argmax(axis=1)]
        submission = submission_csv(splits.test.filenames, names)
    expected = _testing_set_rows(data_dir) if data_dir is not None else None
    missing = _missing_rows(expected, splits.test.filenames) if expected is not None else []
    if submission is not None or missing:
        report["submission"] = {
            "file": SUBMISSION_CSV if submission is not None else None,
            "rows": len(names),
            "testing_set_rows": len(expected) if expected is not None else None,
            "missing": missing,
        }
    else:
        report["submission"] = None

    if probe_variables is not None:
        report["linear_probe"] = _linear_probe(
            splits, classes, config, probe, probe_variables, batch_size, mesh, frames
        )
        report["fine_tuning_gain"] = (
            report["model"]["accuracy"] - report["linear_probe"]["metrics"]["accuracy"]
        )
    write_report(report, out_dir, submission=submission)
    return report


def _testing_set_rows(data_dir: str | Path) -> list[str] | None:
    """Testing_set.csv's data rows in file order, each as its filename ("line N" if it has none).

    None when ``data_dir`` has no Testing_set.csv, or an empty one (no test split, as for
    training). Faulty rows count: Kaggle expects them too.
    """
    path = Path(data_dir) / kaggle.TEST_CSV
    if not path.exists() or kaggle.is_blank_csv(path):
        return None
    table = kaggle.read_table(path, kaggle.TEST_COLUMNS, split="test")
    rows = [(e.line, e.filename) for e in table.entries]
    rows += [(i.line or 0, i.filename or f"line {i.line}") for i in table.issues]
    return [name for _, name in sorted(rows)]


def _missing_rows(expected: list[str], submitted) -> list[str]:
    """The rows of ``expected`` with no submitted prediction, each named once, in file order."""
    have = set(submitted)
    return list(dict.fromkeys(name for name in expected if name not in have))


def _linear_probe(
    splits, classes, config: Config, source, variables, batch_size, mesh, frames
) -> dict:
    extractor = PooledBackbone()
    train_x = predict_logits(extractor, variables, splits.train, batch_size, mesh, frames)
    val_x = predict_logits(extractor, variables, splits.val, batch_size, mesh, frames)
    probe = fit_linear_probe(train_x, np.asarray(splits.train.labels), len(classes))
    pred = probe.logits(val_x).argmax(axis=1)
    return {
        "description": (
            "logistic regression on the frozen ImageNet MobileNetV2's pooled features "
            f"({train_x.shape[1]}-d, {source} weights, {config.model.image_size}px), "
            "fitted on the same training split"
        ),
        "train_examples": probe.num_examples,
        "train_accuracy": float(
            np.mean(probe.logits(train_x).argmax(axis=1) == np.asarray(splits.train.labels))
        ),
        "metrics": classification_metrics(np.asarray(splits.val.labels), pred, classes),
    }


def submission_csv(filenames: list[str] | tuple[str, ...], labels: list[str]) -> str:
    """Kaggle's submission shape: a ``filename,label`` header, then one row per test image."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("filename", "label"))
    writer.writerows(zip(filenames, labels, strict=True))
    return buf.getvalue()


def write_report(
    report: dict[str, Any], out_dir: str | Path, *, submission: str | None = None
) -> dict[str, Path]:
    """Writes report.json, report.md, the two PNGs and ``submission`` (submission.csv).

    Every file's content is made, then every file written to disk, before the first replaces
    its old version (``atomic_write_files``): a failure leaves the previous report whole, not
    half old, half new. Without a ``submission``, a submission.csv left there by an earlier
    report is removed (it came from another model).

    Returns:
      {"json", "markdown", "confusion", "per_class"[, "submission"]}: the paths written.
    """
    out_dir = Path(out_dir)
    contents: dict[str, tuple[Path, bytes]] = {
        "json": (out_dir / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode()),
        "markdown": (out_dir / REPORT_MD, to_markdown(report).encode()),
        "confusion": (out_dir / CONFUSION_PNG, confusion_png(report["model"])),
        "per_class": (out_dir / PER_CLASS_PNG, per_class_png(report["model"])),
    }
    if submission is not None:
        contents["submission"] = (out_dir / SUBMISSION_CSV, submission.encode())
    atomic_write_files(dict(contents.values()))
    if submission is None:
        (out_dir / SUBMISSION_CSV).unlink(missing_ok=True)
    return {key: path for key, (path, _) in contents.items()}


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: summary, per-class table, confusion matrix, baseline."""
    m = report["model"]
    lines = [
        "# Evaluation report",
        "",
        f"Model: `{report['model_dir']}` (version {report.get('model_version')}), "
        f"{report['split']} split, {m['num_examples']} images.",
        "",
        "| metric | model |" + (" linear probe |" if "linear_probe" in report else ""),
        "| --- | --- |" + (" --- |" if "linear_probe" in report else ""),
    ]
    probe = report.get("linear_probe", {}).get("metrics")
    rows = [
        ("accuracy", lambda r: r["accuracy"]),
        ("balanced accuracy", lambda r: r["balanced_accuracy"]),
        ("macro F1", lambda r: r["macro_avg"]["f1"]),
        ("weighted F1", lambda r: r["weighted_avg"]["f1"]),
    ]
    for name, get in rows:
        lines.append(f"| {name} | {get(m):.4f} |" + (f" {get(probe):.4f} |" if probe else ""))
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | accuracy | support |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, r in m["per_class"].items():
        lines.append(
            f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | "
            f"{r['accuracy']:.4f} | {r['support']} |"
        )
    for avg in ("macro_avg", "weighted_avg"):
        r = m[avg]
        lines.append(
            f"| *{avg.replace('_', ' ')}* | {r['precision']:.4f} | {r['recall']:.4f} | "
            f"{r['f1']:.4f} | | {m['num_examples']} |"
        )
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    lines.append("| | " + " | ".join(m["classes"]) + " |")
    lines.append("| --- " * (len(m["classes"]) + 1) + "|")
    for name, row in zip(m["classes"], m["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"![confusion matrix]({CONFUSION_PNG})", f"![per class]({PER_CLASS_PNG})"]
    if probe:
        lines += [
            "",
            "## Baseline: linear probe",
            "",
            report["linear_probe"]["description"] + ".",
            f"Validation accuracy {probe['accuracy']:.4f} against the fine-tuned model's "
            f"{m['accuracy']:.4f} (gain {report['fine_tuning_gain']:+.4f}).",
        ]
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["", f"## Skipped rows and images ({len(skipped)})", ""]
        lines.append(
            "Left out of every metric and of the submission (data.skip_bad_images / "
            "har-evaluate --skip-bad-images):"
        )
        lines += [""] + [f"- `{s['file']}`: {s['reason']}" for s in skipped[:_MD_LIST]]
        if len(skipped) > _MD_LIST:
            lines.append(f"- ... and {len(skipped) - _MD_LIST} more (see {REPORT_JSON})")
    lines += ["", "## Kaggle submission", ""]
    lines += _submission_markdown(report.get("submission"))
    return "\n".join(lines) + "\n"


def _submission_markdown(sub: dict[str, Any] | None) -> list[str]:
    if not sub:
        return ["No test images, so no submission file."]
    lines = []
    if sub["file"]:
        lines.append(f"`{sub['file']}`: {sub['rows']} rows (`filename,label`) for Testing_set.csv.")
    else:
        lines.append("No readable test image, so no submission file.")
    missing = sub.get("missing") or []
    if missing:
        names = ", ".join(f"`{m}`" for m in missing[:_MD_LIST])
        more = f" ... and {len(missing) - _MD_LIST} more (see {REPORT_JSON})"
        lines += [
            "",
            f"**Warning: {len(missing)} of the {sub['testing_set_rows']} Testing_set.csv rows "
            "have no row in the submission** (skipped as bad rows or unreadable images: no "
            "label was made up for them); Kaggle expects one row per Testing_set.csv row. Missing: "
            + names
            + (more if len(missing) > _MD_LIST else "")
            + ".",
        ]
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def row_rates(cm: np.ndarray) -> np.ndarray:
    """(K, K) confusion counts -> each true class's share per predicted class (rows sum to 1;
    a class without examples is a row of zeros)."""
    cm = np.asarray(cm, np.float64)
    return _safe_div(cm, cm.sum(axis=1, keepdims=True).repeat(cm.shape[1], axis=1))


def confusion_png(metrics: dict[str, Any]) -> bytes:
    """A heat map of the row-normalised confusion matrix, counts written in the cells."""
    plt = _pyplot()
    cm = np.asarray(metrics["confusion_matrix"], np.float64)
    rates = row_rates(cm)
    k = len(metrics["classes"])
    side = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), metrics["classes"], rotation=45, ha="right")
    ax.set_yticks(range(k), metrics["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)  # fmt: skip
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title(f"Confusion matrix (accuracy {metrics['accuracy']:.3f})")
    fig.tight_layout()
    return _png(fig)


def per_class_png(metrics: dict[str, Any]) -> bytes:
    """Grouped bars: precision, recall and F1 of every class."""
    plt = _pyplot()
    names = metrics["classes"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4))
    for i, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, [metrics["per_class"][n][key] for n in names], 0.27, label=key)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per-class precision, recall and F1")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)
