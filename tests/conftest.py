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


# The slowest test files, slowest first (seconds of one run on 2 cores, a slow one, from
# `pytest --junitxml`): `make test` hands whole files to its two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`), so the long ones start first and the short ones
# fill in around them. In xdist's own order (most tests first), the few-test, minutes-long files
# came last and one worker ran the last of them alone. Files not named keep their order, after.
SLOWEST_FIRST = (
    "test_train.py",  # 570 s
    "test_multihost.py",  # 360 s
    "test_end_to_end.py",  # 250 s
    "test_models.py",  # 190 s
    "test_docs.py",  # 180 s
    "test_sharding.py",  # 160 s
    "test_predictor.py",  # 120 s
    "test_bench_train.py",  # 90 s
    "test_webui.py",  # 80 s
)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
