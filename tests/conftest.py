"""Shared fixtures: real photographs (from scikit-image's wheel, CC0) and an output folder."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

# Keras (a test-only reference) must not look for TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "jax")

REPO = Path(__file__).resolve().parents[1]
PHOTO_NAMES = ("chelsea", "coffee", "rocket", "astronaut")


def _jpeg(array: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    """Real RGB photographs as uint8 (H, W, 3): a cat, a cup of coffee, a rocket, an astronaut."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def photos(photo_arrays) -> dict[str, bytes]:
    """The same photographs, JPEG-encoded the way a user would upload them."""
    return {name: _jpeg(a) for name, a in photo_arrays.items()}


@pytest.fixture(scope="session")
def cat_jpeg(photos) -> bytes:
    return photos["chelsea"]


@pytest.fixture
def output_dir(request) -> Path:
    """A per-test folder under test-output/ for artefacts worth keeping (screenshots, reports)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
    path = REPO / "test-output" / name
    path.mkdir(parents=True, exist_ok=True)
    return path
