"""Shared fixtures: real photographs (from scikit-image's wheel, CC0) and an output folder."""

from __future__ import annotations

import atexit
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

# Keras (a test-only reference) must not look for TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "jax")
# One compilation cache for every training run in this process (har_flax.train keeps a cache
# that is set already), so tests training the same configuration compile it once. Commands the
# tests start keep their own: a restart's reuse of W/jax_cache is tested that way, and some
# tests need a server that takes its time compiling.
_JAX_CACHE = tempfile.mkdtemp(prefix="har-test-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)

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
