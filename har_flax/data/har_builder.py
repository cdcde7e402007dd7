"""The tensorflow-datasets builder: Kaggle-layout JPEGs -> pre-resized uint8 arrays, array_record.

Images are decoded and resized once (in a thread pool, with a progress bar) with the same
:func:`har_flax.images.resize_frame` the Predictor uses, and stored as ``Tensor`` features in
array_record files, which tfds writes and reads by random access without TensorFlow. The config
name holds the image size, a fingerprint of the data directory's files and a hash of its path
(the "place"), so 32 px and 224 px copies, copies of two folders, or copies of an edited data set
never collide, and the copies an edit made stale are known (:func:`remove_stale_copies`)::

    TFDS_DIR/har_kaggle/<S>px-<fingerprint>-<place>/1.0.0/har_kaggle-{train,test}.array_record-*

Records keep CSV row order (shuffling disabled, keys = CSV line numbers); the builder's
``info.metadata`` lists the stored files with their labels, and the skipped rows with reasons.

Reading a record back costs about 1 ms of example parsing per image, under the GIL, far slower
than an accelerator trains. So :func:`images_array` copies each split once, on first use, into
one uint8 ``.npy`` file beside the shards, which training memory-maps: a batch is then a single
gather::

    TFDS_DIR/har_kaggle/<S>px-<fingerprint>-<place>/1.0.0/har_kaggle-{train,test}.images-<shards>.npy
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from har_flax import images
from har_flax.data import kaggle
from har_flax.logs import without_absl_notices

log = logging.getLogger(__name__)

# Two warnings tfds logs for every builder like ours; neither asks anything of a user.
# "Using custom data configuration" (each prepared copy has its own config, made at run time)
# and "Variant folder ... has no dataset_info.json" (a copy not prepared yet).
_TFDS_NOTICES = ("Using custom data configuration", "has no dataset_info.json")

NAME = "har_kaggle"
# Chunk of rows decoded concurrently: bounds memory while keeping every worker busy.
_CHUNK = 256


@dataclasses.dataclass(eq=False)
class HarKaggleConfig(tfds.core.BuilderConfig):
    """One prepared copy: an image size for one state of the data directory.

    Attributes:
      image_size: S, the side every image is resized to.
    """

    image_size: int = 224


def fingerprint(data_dir: str | Path) -> str:
    """A short hash of the CSVs' bytes and every image's name, size and mtime.

    Cheap (no image is read): a changed CSV, an added, replaced or deleted image gives a new
    fingerprint and so a new prepared copy instead of stale arrays.
    """
    root = Path(data_dir)
    h = hashlib.sha256()
    for name in (kaggle.TRAIN_CSV, kaggle.TEST_CSV):
        path = root / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
    for folder in (kaggle.TRAIN_DIR, kaggle.TEST_DIR):
        path = root / folder
        if not path.is_dir():
            continue
        entries = sorted(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns)
            for e in os.scandir(path)
            if e.is_file()
        )
        for name, size, mtime in entries:
            # os.fsencode: a name that is not UTF-8 (a legacy zip's Latin-1) is its raw bytes.
            h.update(os.fsencode(f"{folder}/{name}") + f"\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:12]


def place(data_dir: str | Path) -> str:
    """A short hash of the data directory's absolute path (its copies' common name part)."""
    return hashlib.sha256(os.fsencode(Path(data_dir).resolve())).hexdigest()[:8]


def copy_name(data_dir: str | Path, image_size: int) -> str:
    """The name of ``data_dir``'s copy at ``image_size``: ``<S>px-<fingerprint>-<place>``."""
    return f"{image_size}px-{fingerprint(data_dir)}-{place(data_dir)}"


def data_version(builder: HarKaggle) -> str:
    """The fingerprint of the files ``builder``'s copy was made from."""
    return builder.builder_config.name.split("-")[1]


def decode_image(path: Path, size: int) -> np.ndarray:
    """Reads one image file and resizes its first frame: the builder's whole per-image work.

    Args:
      path: the image file.
      size: output side S.

    Returns:
      uint8 (S, S, 3).

    Raises:
      OSError: the file cannot be read.
      har_flax.images.ImageError: not a decodable image.
    """
    data = path.read_bytes()
    frame = images.first_frame_of_file(data, field=f"{path.parent.name}/{path.name}")
    return images.resize_frame(frame, size)


def _decode_or_reason(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(path, size), None
    except images.ImageError as e:
        return None, e.reason
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a data set that is never on TFDS' GCS bucket.

    TFDS looks for an unprepared data set's info there, making a temporary folder first; with
    GCS disabled it returns without removing it, so every preparation left an empty
    /tmp/tmp*tfds folder behind.
    """

    def initialize_from_bucket(self) -> None:
        pass


class HarKaggle(tfds.core.GeneratorBasedBuilder):
    """Kaggle "Human Action Recognition" layout, or any data set in that layout."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pre-resized uint8 Tensor features, CSV row order."}
    BUILDER_CONFIGS = [HarKaggleConfig(name="224px", image_size=224)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download and unzip the Kaggle data set into the manual directory (the --data-dir):
      kaggle datasets download -d meetnagadia/human-action-recognition-har-dataset
      unzip human-action-recognition-har-dataset.zip -d DATA
    It must hold Training_set.csv (filename,label), Testing_set.csv (filename),
    train/Image_N.jpg and test/Image_N.jpg. Any data set in this layout works.
    """

    def __init__(
        self,
        *,
        skip_bad_images: bool = False,
        skip_bad_test_images: bool = False,
        workers: int | None = None,
        progress: bool = True,
        unreadable_test: Sequence[kaggle.Issue] | None = None,
        **kwargs,
    ):
        """See :class:`tfds.core.GeneratorBasedBuilder`.

        Args:
          skip_bad_images: skip (and list in ``info.metadata["skipped"]``) bad rows and images
            instead of failing on them.
          skip_bad_test_images: the same for the test split only (training never reads it).
          workers: decoding threads (default: one per CPU).
          progress: show the decoding progress bar.
          unreadable_test: the test split's images, all found unreadable by an earlier try
            (tfds cannot store an empty split): the copy is prepared without a test split, and
            these are listed as skipped.
          **kwargs: ``data_dir``, ``config``, ... as for any tfds builder.
        """
        self._skip_bad_images = skip_bad_images
        self._skip_bad_test_images = skip_bad_images or skip_bad_test_images
        self._workers = workers or os.cpu_count() or 1
        self._progress = progress
        self._unreadable_test = unreadable_test
        super().__init__(**kwargs)

    # tfds derives this from the package's resources, which for an editable install is a
    # MultiplexedPath that tfds 4.9 checks against the absent `importlib_resources` backport.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    @property
    def image_size(self) -> int:
        return self.builder_config.image_size

    # tfds prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
    # and "... downloaded and prepared ..." to stdout; nothing is downloaded here, and
    # prepare() logs where the copy goes.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        log.info("prepared %s", self.data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.image_size
        return _LocalDatasetInfo(
            builder=self,
            description="Human actions in still images, resized to uint8 squares.",
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image features need TensorFlow to encode/decode.
                    "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
                    # Index into metadata["classes"]; -1 in the unlabelled test split.
                    "label": tfds.features.Scalar(dtype=np.int32),
                    "filename": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/datasets/meetnagadia/human-action-recognition-har-dataset",
            metadata=tfds.core.MetadataDict(),
            # CSV order (keys are line numbers): the stored order is known without reading it.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        layout = kaggle.read_layout(dl_manager.manual_dir)
        # Without skipping, bad rows and unreadable images of both splits are gathered and
        # raised together once the last split is decoded: one run lists every problem, rather
        # than one kind per run (each run decoding every image again to find the next kind).
        self._problems = [i for i in layout.issues if not self._skips(i.split)]
        if len(layout.classes) < 2:  # no image can change that: said before any decoding
            raise kaggle.DataError(
                f"{layout.root}: need at least two classes with images, found "
                f"{list(layout.classes)}"
                + (f"; its faulty rows:\n{kaggle.list_issues(layout.issues)}"
                   if layout.issues else "")
            )  # fmt: skip
        if not self._skip_bad_images:
            # Listed with the other problems, so that fixing the CSV takes one run, not two.
            self._problems += kaggle.singleton_labels(layout.train)
        meta = self.info.metadata
        meta.update(
            classes=list(layout.classes),
            image_size=self.image_size,
            # Absolute: remove_stale_copies matches copies of one folder by it, from any cwd.
            source=os.fspath(layout.root.resolve()),
            skipped=[i.to_dict() for i in [*layout.issues, *(self._unreadable_test or ())]],
            stored={},
        )
        # tfds generates the splits in this order. The test split goes first: were all of its
        # images unreadable (and skipped), prepare() tries again without it, decoding nothing
        # twice. tfds cannot store an empty split; a data set without test images has none.
        splits = {}
        if layout.test and self._unreadable_test is None:
            splits["test"] = self._generate_examples(layout, "test", layout.test, False)
        splits["train"] = self._generate_examples(layout, "train", layout.train, True)
        return splits

    def _skips(self, split: str) -> bool:
        """Whether bad rows and images of ``split`` are skipped (else they fail the build)."""
        return self._skip_bad_test_images if split == "test" else self._skip_bad_images

    def _generate_examples(
        self, layout: kaggle.Layout, split: str, entries: Sequence[kaggle.Entry], last: bool
    ) -> Iterator[tuple[int, dict]]:
        size = self.image_size
        index = {c: i for i, c in enumerate(layout.classes)}
        csv_name = kaggle.TRAIN_CSV if split == "train" else kaggle.TEST_CSV
        stored: list[list] = []
        bad: list[kaggle.Issue] = []
        bar = tqdm.tqdm(
            total=len(entries),
            desc=f"Decoding {split} images to {size}px",
            unit="img",
            disable=not self._progress,
        )
        with bar, concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            for start in range(0, len(entries), _CHUNK):
                chunk = entries[start : start + _CHUNK]
                paths = [layout.image_path(split, e.filename) for e in chunk]
                for e, (array, reason) in zip(
                    chunk, pool.map(_decode_or_reason, paths, [size] * len(chunk)), strict=True
                ):
                    bar.update()
                    if array is None:
                        folder = kaggle.TRAIN_DIR if split == "train" else kaggle.TEST_DIR
                        bad.append(
                            kaggle.Issue("unreadable_image", split, e.filename, e.line,
                                         f"{csv_name} line {e.line}: {folder}/{e.filename} is "
                                         f"unreadable: {reason}")
                        )  # fmt: skip
                        continue
                    stored.append([e.filename, e.label] if split == "train" else [e.filename])
                    label = index[e.label] if split == "train" else -1
                    yield e.line, {"image": array, "label": label, "filename": e.filename}
        if not self._skips(split):
            self._problems += bad
        # tfds (generating the splits in order) gets nothing more of a data set that fails.
        if self._problems and (last or not stored):
            # The test split's, skipped when training (which does not read it), are named too.
            unread = [] if self._skip_bad_images or not self._skips("test") else [
                kaggle.Issue(**d) for d in self.info.metadata["skipped"] if d["split"] == "test"
            ]  # fmt: skip
            kaggle.raise_issues(self._problems, what="bad rows or images", unread=unread)
        if not stored and split == "test":
            raise _NoReadableTestImage(bad)
        if not stored:
            rows = layout.train_table.num_rows
            faults = sorted([*(i for i in layout.issues if i.split == split), *bad],
                            key=lambda i: i.line or 0)  # fmt: skip
            raise kaggle.DataError(
                f"none of the {rows} rows of {layout.train_table.path} names a readable "
                f"image:\n{kaggle.list_issues(faults)}\n"
                "Check that the data set was unzipped completely."
            )
        meta = self.info.metadata
        meta["skipped"] = meta["skipped"] + [i.to_dict() for i in bad]
        meta["stored"] = {**meta["stored"], split: stored}
        log.info("writing the %s split's %d images as array_record shards", split, len(stored))


class _NoReadableTestImage(Exception):
    """Every test image was unreadable (and skipped): tfds cannot store the empty split."""

    def __init__(self, issues: list[kaggle.Issue]):
        super().__init__(f"{len(issues)} unreadable test images")
        self.issues = issues


def builder_for(
    data_dir: str | Path,
    *,
    image_size: int,
    tfds_dir: str | Path,
    skip_bad_images: bool = False,
    skip_bad_test_images: bool = False,
    workers: int | None = None,
    progress: bool = True,
    unreadable_test: Sequence[kaggle.Issue] | None = None,
) -> HarKaggle:
    """The builder of ``data_dir`` at ``image_size`` (prepared or not) cached under ``tfds_dir``."""
    config = HarKaggleConfig(
        name=copy_name(data_dir, image_size),
        image_size=image_size,
        description=f"{image_size}x{image_size} arrays of {os.fspath(data_dir)}",
    )
    with without_absl_notices(*_TFDS_NOTICES):
        return HarKaggle(
            data_dir=os.fspath(tfds_dir),
            config=config,
            skip_bad_images=skip_bad_images,
            skip_bad_test_images=skip_bad_test_images,
            workers=workers,
            progress=progress,
            unreadable_test=unreadable_test,
        )


def prepare(
    data_dir: str | Path,
    *,
    image_size: int,
    tfds_dir: str | Path,
    skip_bad_images: bool = False,
    skip_bad_test_images: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> HarKaggle:
    """Builds the arrays once (a no-op when this data at this size is already prepared).

    Args:
      data_dir: the Kaggle-layout directory (the tfds manual directory).
      image_size: S.
      tfds_dir: where prepared copies are kept (a tfds ``data_dir``).
      skip_bad_images: skip and list bad rows/images instead of raising.
      skip_bad_test_images: the same for the test split only.
      workers: decoding threads.
      progress: show the decoding progress bars while building.

    Returns:
      The prepared builder; ``as_data_source(split)`` reads it by random access.

    Raises:
      har_flax.data.kaggle.DataError: bad data and ``skip_bad_images`` is False.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise kaggle.DataError(f"data directory {data_dir} does not exist")

    def builder(unreadable_test: list[kaggle.Issue] | None = None) -> HarKaggle:
        return builder_for(
            data_dir,
            image_size=image_size,
            tfds_dir=tfds_dir,
            skip_bad_images=skip_bad_images,
            skip_bad_test_images=skip_bad_test_images,
            workers=workers,
            progress=progress,
            unreadable_test=unreadable_test,
        )

    ours = builder()
    with without_absl_notices(*_TFDS_NOTICES):
        prepared = ours.is_prepared()
    if prepared:
        return ours
    log.info("preparing %s at %dpx into %s", data_dir, image_size, ours.data_dir)

    def build(b: HarKaggle) -> None:
        # Our decoding bars only: tfds' own ("Generating splits", "Generating train examples"
        # stuck at 0 as ours count, "Shuffling <a 200-character file pattern>") add nothing.
        with _without_tfds_progress_bars(), _tfds_shuffle_in_memory():
            b.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir)),
            )

    try:
        try:
            build(ours)
        except _NoReadableTestImage as e:
            log.warning("none of the %d test images is readable; preparing without a test "
                        "split", len(e.issues))  # fmt: skip
            ours = builder(e.issues)
            build(ours)
        remove_stale_copies(ours)
    except FileExistsError:
        # tfds prepares into a temporary folder and renames it at the end; another run sharing
        # tfds_dir (a sweep with one --download-dir) renamed the same copy first. Use theirs.
        theirs = builder()
        with without_absl_notices(*_TFDS_NOTICES):
            if not theirs.is_prepared():
                raise
        log.info("%s was prepared meanwhile by another run; using that copy", theirs.data_dir)
        return theirs
    return ours


# A copy being removed is first renamed to this (atomic): tfds never takes it for a prepared one.
_REMOVING = ".removing-"


def remove_stale_copies(current: HarKaggle) -> list[Path]:
    """Deletes the other prepared copies of ``current``'s data directory at its image size.

    They were made from the folder's files as they were before a change (an image added,
    replaced, deleted or touched; a CSV edited), so no run can read them again unless the change
    is undone, and each holds the data set twice (records and array files, about 2.8 GB for the
    Kaggle set at 224 px). Copies of other folders or at other sizes are kept, and so is a copy
    whose array file another process is building right now. A copy is renamed before it is
    deleted, so an interrupted removal never leaves a half copy that looks prepared; what such
    an interruption left is deleted on the next call.

    Args:
      current: the copy just prepared.

    Returns:
      The copies removed (their folders, ``<tfds_dir>/har_kaggle/<S>px-<fingerprint>-<place>``).
    """
    here = Path(os.fspath(current.data_dir)).parent  # <tfds_dir>/har_kaggle/<config>
    source = Path(current.info.metadata["source"])
    size, _, where = current.builder_config.name.split("-")
    removed = []
    for copy in sorted(here.parent.iterdir()):
        if _REMOVING in copy.name:
            _remove_tree(copy)
            continue
        # Copies named by fingerprint alone (made before places) are of the folder that their
        # metadata names: _is_stale_copy_of checks that.
        parts = copy.name.split("-")
        if parts[0] != size or parts[2:] not in ([where], []):
            continue
        if parts[2:] == [where] and copy.is_dir():
            _remove_abandoned_builds(copy)
            if copy != here and not any(copy.iterdir()):  # a preparation that never finished
                _remove_tree(copy)
                removed.append(copy)
                continue
        if copy == here or not _is_stale_copy_of(copy, source, current.image_size):
            continue
        nbytes = sum(f.stat().st_size for f in copy.rglob("*") if f.is_file())
        doomed = copy.with_name(f"{copy.name}{_REMOVING}{uuid.uuid4().hex[:8]}")
        try:
            copy.rename(doomed)
        except OSError as e:  # removed meanwhile by another run, or not ours to move
            log.debug("kept %s: %s", copy, e)
            continue
        _remove_tree(doomed)
        log.info("removed %s, the %dpx copy of %s before its files changed (%s)", copy.name,
                 current.image_size, source, images.human_bytes(nbytes))  # fmt: skip
        removed.append(copy)
    return removed


# tfds prepares into <copy>/incomplete.<random>_<version>/ and renames it when done: a kill
# (out of memory: preparing holds a split in memory) leaves it. Nothing inside it changes while
# the images decode (minutes for the Kaggle set, more on a slow disk), so only one untouched
# this long is taken for abandoned: another run sharing the folder may be building it.
_ABANDONED_BUILD_SECONDS = 3 * 3600
_INCOMPLETE = "incomplete."


def _remove_abandoned_builds(copy: Path) -> None:
    """Deletes the unfinished build folders in ``copy`` untouched for _ABANDONED_BUILD_SECONDS."""
    for build in copy.glob(f"{_INCOMPLETE}*"):
        try:
            newest = max(p.stat().st_mtime for p in [build, *build.rglob("*")])
        except (OSError, ValueError):  # removed meanwhile
            continue
        if time.time() - newest > _ABANDONED_BUILD_SECONDS:
            _remove_tree(build)
            log.info("removed %s, left by a preparation that did not finish", build)


def _is_stale_copy_of(copy: Path, source: Path, image_size: int) -> bool:
    """Whether ``copy`` is a finished copy of ``source`` at ``image_size`` that no build uses
    (an unfinished build left in it goes with it)."""
    versions = (
        [v for v in copy.iterdir() if v.is_dir() and not v.name.startswith(_INCOMPLETE)]
        if copy.is_dir()
        else []
    )
    if len(versions) != 1:  # not a copy this code made (or tfds is preparing it)
        return False
    try:
        meta = json.loads((versions[0] / "metadata.json").read_text())
        same = Path(meta["source"]) == source and meta["image_size"] == image_size
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return same and not any(_written_lately(tmp) for tmp in versions[0].glob(".*.tmp"))


def _written_lately(path: Path) -> bool:
    """Whether a build's temporary file was written within _STALE_TMP_SECONDS (it goes on)."""
    try:
        return time.time() - path.stat().st_mtime <= _STALE_TMP_SECONDS
    except OSError:  # renamed into place or removed meanwhile: that build is over
        return False


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # tried again on the next preparation in this folder
        log.warning("could not remove all of %s; delete it by hand", path)


def images_array(builder: HarKaggle, split: str, *, progress: bool = True) -> np.ndarray:
    """A prepared split's images as one read-only uint8 [n, S, S, 3] array, in record order.

    The array is a memory-mapped ``.npy`` file, built from the array_record shards the first
    time it is asked for (through a temporary file and an atomic rename, so an interrupted build
    leaves nothing half-written) and reused after. Its name holds the shards' names, sizes and
    modification times, so re-prepared shards get a new file (the old one is removed).

    Args:
      builder: a prepared builder (:func:`prepare`).
      split: ``"train"`` or ``"test"``.
      progress: show a progress bar while building.

    Returns:
      The images; row r is record r, whose filename is ``info.metadata["stored"][split][r][0]``.

    Raises:
      har_flax.data.kaggle.DataError: a record does not hold the image the metadata lists
        (the prepared files were changed).
    """
    size = builder.image_size
    names = [row[0] for row in builder.info.metadata["stored"].get(split, [])]
    shape = (len(names), size, size, 3)
    if not names:
        return np.zeros(shape, np.uint8)
    folder = Path(os.fspath(builder.data_dir))
    shards = sorted(folder.glob(f"{NAME}-{split}.array_record*"))
    key = hashlib.sha256(
        repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]).encode()
    ).hexdigest()[:12]
    path = folder / f"{NAME}-{split}.images-{key}.npy"
    _remove_stale_temporaries(folder, split)
    try:
        array = np.load(path, mmap_mode="r")
        if array.shape == shape and array.dtype == np.uint8:
            return array
        log.warning("%s holds %s %s, expected %s uint8; rebuilding", path, array.shape,
                    array.dtype, shape)  # fmt: skip
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # truncated or not an .npy: rebuild it
        log.warning("%s is unreadable (%s); rebuilding", path, e)
    _write_images_array(builder, split, names, path, progress)
    for old in folder.glob(f"{NAME}-{split}.images-*.npy"):
        if old != path:
            old.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


# A build in progress writes its temporary file all along; one untouched this long was killed.
_STALE_TMP_SECONDS = 600


def _remove_stale_temporaries(folder: Path, split: str) -> None:
    """Deletes what killed array builds left (up to the size of the whole array each)."""
    for tmp in folder.glob(f".{NAME}-{split}.images-*.npy.*.tmp"):
        if _written_lately(tmp):  # a build going on
            continue
        try:
            tmp.unlink()
            log.info("removed %s, left by a build that did not finish", tmp.name)
        except OSError:
            pass  # gone meanwhile, or another process's to remove


def _write_images_array(
    builder: HarKaggle, split: str, names: Sequence[str], path: Path, progress: bool
) -> None:
    size = builder.image_size
    source = builder.as_data_source(split)
    # Created by open_memmap with the usual permissions (mkstemp's 0600 would hide a copy on a
    # shared disk from other users); the random part keeps concurrent builders apart.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(names), size, size, 3))
        bar = tqdm.tqdm(total=len(names), desc=f"Caching {split} arrays", unit="img",
                        disable=not progress)  # fmt: skip
        with bar:
            for start in range(0, len(names), _CHUNK):
                rows = range(start, min(start + _CHUNK, len(names)))
                for r, ex in zip(rows, source.__getitems__(list(rows)), strict=True):
                    name = ex["filename"]
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    if name != names[r]:
                        raise kaggle.DataError(
                            f"prepared {split} record {r} holds {name}, expected {names[r]}; "
                            f"delete the prepared copy {path.parent} to rebuild it"
                        )
                    out[r] = ex["image"]
                bar.update(len(rows))
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _tfds_shuffle_in_memory() -> Iterator[None]:
    """Keeps tfds' record sorter in memory for the block, however large the split.

    tfds' writer collects a split's serialized records and, past 1 GB, spills them to bucket
    files through ``tf.io.gfile``: without TensorFlow, that fails ("No module named
    'tensorflow'"). The Kaggle set's 12,600 training images at 224 px are 1.9 GB, so without
    this the real data could not be prepared. The cost: preparing holds the largest split's
    arrays in memory once (1.9 GB there).
    """
    from tensorflow_datasets.core import shuffle  # noqa: PLC0415

    before = shuffle.MAX_MEM_BUFFER_SIZE
    shuffle.MAX_MEM_BUFFER_SIZE = float("inf")
    try:
        yield
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = before


@contextlib.contextmanager
def _without_tfds_progress_bars() -> Iterator[None]:
    """tensorflow-datasets' own bars off for the block (their switch is process-wide)."""
    from tensorflow_datasets.core.utils import tqdm_utils  # noqa: PLC0415

    before = tqdm_utils._active  # noqa: SLF001 (tfds has a setter but no getter)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(before)
