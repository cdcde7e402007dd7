"""Synthetic images in the exact Kaggle HAR layout, for tests and smoke runs on a CPU.

Each class is a shape of its own colour in its own region of the picture, drawn on a noisy
background of random colour and random size and aspect, then JPEG-encoded. A small CNN learns it
in a few epochs; the mean colour of an image alone does not give the class away, because the
background colour (most of the pixels) is random.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from har_flax.data import kaggle

TEST_LABELS_CSV = "test_labels.csv"  # Hidden labels of the test split; NOT part of Kaggle's layout.

_SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring")
# Region centres as fractions of (width, height).
_PLACES = ((0.3, 0.3), (0.7, 0.7), (0.7, 0.3), (0.3, 0.7), (0.5, 0.5))
# Well-separated hues, one per class (cycled beyond 15 classes).
_COLOURS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (245, 130, 48), (0, 0, 128), (128, 128, 0),
    (170, 110, 40), (0, 128, 128), (250, 190, 212), (128, 0, 0), (255, 255, 255),
)  # fmt: skip


def class_style(index: int) -> tuple[str, tuple[float, float], tuple[int, int, int]]:
    """The (shape, centre fraction, RGB colour) that draws class ``index``."""
    shape = _SHAPES[index % len(_SHAPES)]
    # Stepping the place by a different rate than the shape gives 25 distinct shape/place pairs.
    place = _PLACES[(index + index // len(_SHAPES)) % len(_PLACES)]
    return shape, place, _COLOURS[index % len(_COLOURS)]


def render_image(
    index: int, rng: np.random.Generator, *, min_size: int = 48, max_size: int = 120
) -> np.ndarray:
    """Draws one picture of class ``index``.

    Args:
      index: the class index (its shape, place and colour come from :func:`class_style`).
      rng: the random source (size, background, jitter, noise).
      min_size: smallest width or height in pixels.
      max_size: largest width or height in pixels.

    Returns:
      uint8 (H, W, 3) with H, W drawn independently from [min_size, max_size].
    """
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0.0, 25.0, size=(h, w, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)

    shape, (fx, fy), colour = class_style(index)
    side = min(w, h)
    r = side * rng.uniform(0.16, 0.22)  # Large enough to survive a resize to 32x32.
    cx = w * fx + rng.uniform(-0.06, 0.06) * w
    cy = h * fy + rng.uniform(-0.06, 0.06) * h
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        t = r / 3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    else:  # ring
        draw.ellipse(box, outline=colour, width=max(2, int(r / 2.5)))
    return np.asarray(image)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_synthetic_kaggle(
    root: str | Path,
    *,
    classes: Sequence[str] = ("calling", "clapping", "cycling"),
    train_per_class: int = 40,
    test_count: int = 12,
    min_size: int = 48,
    max_size: int = 120,
    seed: int = 0,
) -> Path:
    """Writes a synthetic data set in the Kaggle HAR layout.

    Files written under ``root``: ``Training_set.csv`` (``filename,label``, classes interleaved
    at random like Kaggle's), ``Testing_set.csv`` (``filename``), ``train/Image_N.jpg`` and
    ``test/Image_N.jpg`` (N from 1 in each folder), plus ``test_labels.csv``
    (``filename,label``), the test split's labels that Kaggle keeps hidden, for scoring.

    Args:
      root: the directory to create or fill.
      classes: class names; class i is drawn with :func:`class_style` (i).
      train_per_class: labelled images per class.
      test_count: test images, classes drawn in turn then shuffled.
      min_size: smallest image side in pixels.
      max_size: largest image side in pixels.
      seed: fixes every pixel; the same arguments give the same files.

    Returns:
      ``root`` as a Path.
    """
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"need at least two distinct class names, got {list(classes)}")
    if train_per_class < 1 or test_count < 0:
        raise ValueError("train_per_class must be >= 1 and test_count >= 0")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n, labels_csv in (
        ("train", train_per_class * len(classes), kaggle.TRAIN_CSV),
        ("test", test_count, TEST_LABELS_CSV),
    ):
        folder = root / (kaggle.TRAIN_DIR if split == "train" else kaggle.TEST_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        per = train_per_class if split == "train" else -(-n // len(classes))
        indices = rng.permutation(np.repeat(np.arange(len(classes)), per)[:n])
        rows = []
        for i, c in enumerate(indices, start=1):
            name = f"Image_{i}.jpg"
            pixels = render_image(int(c), rng, min_size=min_size, max_size=max_size)
            (folder / name).write_bytes(_jpeg(pixels))
            rows.append((name, classes[int(c)]))
        _write_csv(root / labels_csv, ("filename", "label"), rows)
        if split == "test":
            _write_csv(root / kaggle.TEST_CSV, ("filename",), [(name,) for name, _ in rows])
    return root
