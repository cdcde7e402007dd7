"""The stratified train/validation split of the labelled set, fixed by a seed and kept on disk.

Kaggle's test split has no public labels, so validation is a hold-out of ``Training_set.csv``.
The split is written to ``WORKDIR/split.json`` the first time and read back on every resume and
evaluation, so that no validation image ever leaks into training across restarts.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from har_flax.checkpoint import atomic_write_text
from har_flax.data.kaggle import DataError

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
_FORMAT = 1


def natural_key(filename: str) -> tuple[list, str]:
    """Sort key that puts Image_2.jpg before Image_10.jpg.

    The name itself breaks ties (Image_1.jpg and Image_01.jpg), so that no order depends on
    the CSV's. The digit runs are re.split's odd parts: any Unicode decimal digits, which
    int() reads (str.isdigit would also take superscripts, which it does not).
    """
    parts = re.split(r"(\d+)", filename)
    return [int(t) if i % 2 else t for i, t in enumerate(parts)], filename


def stratified_split(
    filenames: Sequence[str], labels: Sequence[str], *, fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Holds out ``fraction`` of every class, deterministically.

    Each class keeps at least one image on each side; the held-out count per class is
    ``round(n * fraction)`` clipped to ``[1, n - 1]``. The result depends only on the set of
    (filename, label) pairs, the fraction and the seed, not on the CSV's row order.

    Args:
      filenames: [N] image names, unique.
      labels: [N] their class names.
      fraction: share of each class held out for validation, in (0, 1).
      seed: the numpy Generator seed.

    Returns:
      (train, val): filename lists in natural order that partition ``filenames``.

    Raises:
      DataError: a class has fewer than two images (it cannot be on both sides).
    """
    if len(filenames) != len(labels):
        raise ValueError(f"{len(filenames)} filenames but {len(labels)} labels")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_class: dict[str, list[str]] = collections.defaultdict(list)
    for f, c in zip(filenames, labels, strict=True):
        by_class[c].append(f)
    small = {c: fs for c, fs in by_class.items() if len(fs) < 2}
    if small:
        detail = ", ".join(f"{c!r} ({fs[0]})" for c, fs in sorted(small.items()))
        raise DataError(f"cannot stratify: these labels have a single image: {detail}")
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    # Classes in sorted order, files sorted within each: the draw is independent of CSV order.
    for c in sorted(by_class):
        files = sorted(by_class[c], key=natural_key)
        n_val = min(max(int(round(len(files) * fraction)), 1), len(files) - 1)
        order = rng.permutation(len(files))
        val.extend(files[i] for i in order[:n_val])
        train.extend(files[i] for i in order[n_val:])
    return sorted(train, key=natural_key), sorted(val, key=natural_key)


def load_or_create_split(
    workdir: str | Path,
    filenames: Sequence[str],
    labels: Sequence[str],
    *,
    fraction: float,
    seed: int,
    evaluating: bool = False,
    skipped: Collection[str] = (),
    data_version: str | None = None,
) -> tuple[list[str], list[str]]:
    """Reads ``workdir/split.json``, checking it against the data, or makes and writes it.

    Args:
      workdir: the run's work directory.
      filenames: [N] the labelled images available now.
      labels: [N] their class names.
      fraction: validation fraction from ``DataConfig``.
      seed: split seed from ``DataConfig``.
      evaluating: the split is read to evaluate a trained model, not to train. Images of the
        split in ``skipped`` are then left out of it (they are reported as skipped), and the
        advice on a mismatch is to evaluate on the data the model was trained with: a new split
        would put training images in validation.
      skipped: labelled images skipped as bad this time (only used when ``evaluating``).
      data_version: a fingerprint of the image files (names, sizes, modification times), kept
        with the split: a resumed run is warned when its images changed since.

    Returns:
      (train, val) filename lists.

    Raises:
      DataError: split.json was made with another seed or fraction, or names images that are
        not in the data (or misses some that are), or (unless ``evaluating``) the label of one
        of its images changed, or it is unreadable.
    """
    path = Path(workdir) / SPLIT_FILE
    classes = sorted(set(labels))
    if not path.exists():
        train, val = stratified_split(filenames, labels, fraction=fraction, seed=seed)
        record = {
            "format": _FORMAT,
            "seed": seed,
            "val_fraction": fraction,
            "classes": classes,
            "train": train,
            "val": val,
            # What a resumed run checks its data against: a run trains on one data set.
            "labels": dict(zip(filenames, labels, strict=True)),
            "data_version": data_version,
        }
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        return train, val

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        train, val = list(record["train"]), list(record["val"])
        saved_seed, saved_fraction = record["seed"], record["val_fraction"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fix = (
            "restore it from a copy (evaluation must use the run's split)"
            if evaluating
            else "delete it to make a new split"
        )
        raise DataError(f"{path} is unreadable ({e}); {fix}") from e
    if evaluating:
        # A new split would put images the model was trained on into validation.
        hint = (
            "evaluation must use the split the model was trained with: run it on the data the "
            "model was trained on"
        )
    else:
        hint = f"use a new work directory, or delete {path} to split again (validation changes)"
    if saved_seed != seed or saved_fraction != fraction:
        raise DataError(
            f"{path} was made with split_seed={saved_seed}, val_fraction={saved_fraction} but "
            f"the config says split_seed={seed}, val_fraction={fraction}; {hint}"
        )
    if set(train) & set(val):
        raise DataError(f"{path} puts some images in both train and val; {hint}")
    if evaluating and skipped:
        # Bad now (and listed as skipped), usable when the model was trained: not in any metric.
        gone_bad = set(skipped)
        train = [f for f in train if f not in gone_bad]
        val = [f for f in val if f not in gone_bad]
    saved = set(train) | set(val)
    now = set(filenames)
    if saved != now:
        gone = sorted(saved - now)
        new = sorted(now - saved)
        parts = []
        if gone:
            parts.append(f"{len(gone)} split images are not in the data (e.g. {gone[:5]})")
        if new:
            parts.append(f"{len(new)} images of the data are not in the split (e.g. {new[:5]})")
        raise DataError(f"{path} does not match the data: {'; '.join(parts)}; {hint}")
    if record.get("classes", classes) != classes:
        raise DataError(
            f"{path} was made for classes {record['classes']} but the data has {classes}; {hint}"
        )
    if not evaluating:
        # (A re-evaluation may well follow corrected labels; a resumed run must not.)
        saved_labels = record.get("labels") or {}
        label_now = dict(zip(filenames, labels, strict=True))
        relabelled = sorted(
            (f for f, label in label_now.items() if saved_labels.get(f, label) != label),
            key=natural_key,
        )
        if relabelled:
            shown = ", ".join(f"{f} ({saved_labels[f]} -> {label_now[f]})" for f in relabelled[:5])
            raise DataError(
                f"{len(relabelled)} images have another label than when this run started "
                f"(e.g. {shown}): a resumed run would end neither where the old nor where a "
                f"new run would; {hint}"
            )
        saved_version = record.get("data_version")
        if saved_version and data_version and saved_version != data_version:
            log.warning(
                "the image files changed since this run started (%s then, %s now: a file's "
                "size or modification time); the resumed run trains on them as they are now",
                saved_version,
                data_version,
            )
    return train, val
