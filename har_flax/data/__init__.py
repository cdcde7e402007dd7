"""Training data: the Kaggle layout -> prepared uint8 arrays -> train / val / test by random access.

:func:`load_splits` is the one entry point for training and evaluation. It prepares the tfds
array_record copy of the data once (:mod:`har_flax.data.har_builder`), memory-maps its arrays
(:func:`~har_flax.data.har_builder.images_array`), applies the persisted
stratified split (:mod:`har_flax.data.split`) and returns :class:`ArraySource` s that read
batches by index. TensorFlow is never needed.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from har_flax.config import DataConfig
from har_flax.data.kaggle import DataError, Issue, raise_issues

__all__ = ["ArraySource", "DataError", "Splits", "load_splits"]


class ArraySource:
    """A subset of one prepared split, read by random access.

    Attributes:
      filenames: [N] image names, in index order.
      labels: int32 [N] class indices (-1 for the unlabelled test split).
      image_size: S.
    """

    def __init__(
        self,
        images: np.ndarray | Callable[[], np.ndarray],
        records: Sequence[int],
        filenames: Sequence[str],
        labels: np.ndarray,
        image_size: int,
    ):
        """Index i is row ``records[i]`` of ``images``.

        Args:
          images: uint8 [n, S, S, 3] (e.g. memory-mapped), or a function returning it, called
            at the first read: a split only some commands read costs nothing to the others.
          records: [N] rows of ``images``.
          filenames: [N] image names.
          labels: [N] class indices.
          image_size: S.
        """
        if not len(records) == len(filenames) == len(labels):
            raise ValueError("records, filenames and labels must have one entry per example")
        self._images = images
        self._open_lock = threading.Lock()  # a prefetch thread and the caller may both read
        self._records = np.asarray(records, dtype=np.int64)
        self.filenames: tuple[str, ...] = tuple(filenames)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int32)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.filenames)

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} images of {self.image_size}px)"

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reads the examples at ``indices``.

        Args:
          indices: [n] positions in this source, each in ``[0, len(self))``.

        Returns:
          (images uint8 [n, S, S, 3], labels int32 [n]).

        Raises:
          IndexError: an index is out of range.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range [0, {len(self)}): {idx[:8]}")
        return np.asarray(self._array()[self._records[idx]]), self.labels[idx]

    def _array(self) -> np.ndarray:
        with self._open_lock:
            if callable(self._images):
                self._images = self._images()
            return self._images


@dataclasses.dataclass(frozen=True)
class Splits:
    """The data of one run.

    Attributes:
      classes: sorted class names; label i is ``classes[i]``.
      train: the training part of the stratified split.
      val: the held-out part.
      test: Kaggle's ``Testing_set.csv`` images (labels -1).
      skipped: (filename, reason) of every row or image left out (only with
        ``skip_bad_images``; otherwise bad data raises).
      dataset_dir: where the prepared arrays are.
      test_skipped: (filename, reason) of bad test-split rows and images left out without
        ``skip_bad_images`` because training never reads that split (evaluation refuses them).
    """

    classes: tuple[str, ...]
    train: ArraySource
    val: ArraySource
    test: ArraySource
    skipped: list[tuple[str, str]]
    dataset_dir: Path
    test_skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def load_splits(
    data_dir: str | Path,
    workdir: str | Path,
    *,
    image_size: int,
    data_config: DataConfig,
    download_dir: str | Path | None = None,
    progress: bool = True,
    evaluating: bool = False,
) -> Splits:
    """Prepares (once) and opens the data of a run.

    Args:
      data_dir: the Kaggle-layout directory.
      workdir: the run's directory; ``split.json`` is written here (and read on resume).
      image_size: S, the side images are resized to.
      data_config: split fraction and seed, and ``skip_bad_images``.
      download_dir: the tfds data directory holding prepared copies (default
        ``workdir/tfds``); share one between runs to prepare each data set and size once.
      progress: show progress bars while preparing the data.
      evaluating: the splits are for evaluating a trained model: images of ``split.json``
        skipped as bad now are left out of it rather than refused, and a mismatch advises
        evaluating on the model's own data, not splitting again (``split.load_or_create_split``).

    Returns:
      The splits.

    Raises:
      DataError: bad data (naming the CSV line and image) unless ``skip_bad_images``, a class
        with a single image, fewer than two classes, or a ``split.json`` that does not match.
    """
    from har_flax.data import har_builder, split  # noqa: PLC0415 (tfds only when used)

    workdir = Path(workdir)
    tfds_dir = Path(download_dir) if download_dir is not None else workdir / "tfds"
    skip = data_config.skip_bad_images
    builder = har_builder.prepare(
        data_dir,
        image_size=image_size,
        tfds_dir=tfds_dir,
        skip_bad_images=skip,
        # Training never reads the test split: its problems are listed, not fatal.
        skip_bad_test_images=not evaluating,
        progress=progress,
    )
    meta = builder.info.metadata
    skipped = [Issue(**d) for d in meta["skipped"]]
    test_skipped = []
    if not skip:
        if not evaluating:
            test_skipped = [i for i in skipped if i.split == "test"]
            skipped = [i for i in skipped if i.split != "test"]
        # Prepared earlier with skipping on; without it the same data is an error.
        raise_issues(skipped, what="bad rows or images", unread=test_skipped)

    stored_train = [
        tuple(x) for x in meta["stored"]["train"]
    ]  # [(filename, label)] in record order
    counts = collections.Counter(label for _, label in stored_train)
    singles = [
        Issue("singleton_label", "train", f, None,
              f"label {label!r} has a single image ({f}); a stratified split needs at least two")
        for f, label in stored_train
        if counts[label] < 2
    ]  # fmt: skip
    if singles:
        if not skip:
            raise_issues(singles, what="labels that cannot be stratified")
        skipped.extend(singles)
    single_files = {i.filename for i in singles}
    record_of = {f: r for r, (f, _) in enumerate(stored_train) if f not in single_files}
    label_of = {f: label for f, label in stored_train if f in record_of}
    classes = tuple(sorted(set(label_of.values())))
    if len(classes) < 2:
        raise DataError(f"{data_dir}: need at least two classes with images, found {classes}")

    names = sorted(label_of, key=split.natural_key)
    train_names, val_names = split.load_or_create_split(
        workdir,
        names,
        [label_of[f] for f in names],
        fraction=data_config.val_fraction,
        seed=data_config.split_seed,
        evaluating=evaluating,
        skipped={i.filename for i in skipped if i.split == "train" and i.filename},
        data_version=har_builder.data_version(builder),
    )
    index = {c: i for i, c in enumerate(classes)}
    train_images = har_builder.images_array(builder, "train", progress=progress)

    def subset(files: list[str]) -> ArraySource:
        labels = np.array([index[label_of[f]] for f in files], np.int32)
        return ArraySource(train_images, [record_of[f] for f in files], files, labels, image_size)

    stored_test = [x[0] for x in meta["stored"].get("test", [])]
    test = ArraySource(
        # Only evaluation reads it: training never builds this split's array file.
        lambda: har_builder.images_array(builder, "test", progress=progress),
        range(len(stored_test)),
        stored_test,
        np.full(len(stored_test), -1, np.int32),
        image_size,
    )
    return Splits(
        classes=classes,
        train=subset(train_names),
        val=subset(val_names),
        test=test,
        skipped=[(i.filename or f"line {i.line}", i.message) for i in skipped],
        dataset_dir=Path(builder.data_dir),
        test_skipped=[(i.filename or f"line {i.line}", i.message) for i in test_skipped],
    )
