"""The Kaggle HAR layout on disk: reading ``Training_set.csv`` and ``Testing_set.csv``, row checks.

The layout is the data contract (DESIGN.md)::

    DATA/Training_set.csv   filename,label
    DATA/Testing_set.csv    filename            (no public labels; optional for other datasets)
    DATA/train/Image_N.jpg
    DATA/test/Image_N.jpg

Structural faults (a CSV missing, empty or without its columns) always raise :class:`DataError`.
Row faults (duplicates, empty or misspelt labels, missing files, ...) are collected as
:class:`Issue` s so that the caller either raises them, naming file and line, or skips and lists
them (``DataConfig.skip_bad_images``); the explore report lists them all. Nothing is dropped
silently.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TRAIN_CSV = "Training_set.csv"
TEST_CSV = "Testing_set.csv"
TRAIN_DIR = "train"
TEST_DIR = "test"
TRAIN_COLUMNS = ("filename", "label")
TEST_COLUMNS = ("filename",)

# How many issues an error message spells out before summarising the rest.
_MAX_LISTED = 20


def skip_hint(how: str = "set data.skip_bad_images=true") -> str:
    """What to do about bad data, ``how`` saying how the command at hand skips it."""
    return (
        f"fix the data, or {how} to skip these images and list them "
        "(har-explore --data-dir DATA --out REPORT reports on the data set as a whole)"
    )


# What :func:`raise_issues` ends with; a command whose way to skip differs (har-evaluate's
# --skip-bad-images) replaces it in the message with its own ``skip_hint(...)``.
SKIP_HINT = skip_hint()


class DataError(ValueError):
    """The data on disk does not fit the Kaggle layout; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One usable CSV row.

    Attributes:
      filename: the image's name inside ``train/`` or ``test/`` (e.g. ``Image_1.jpg``).
      label: the class name (None for the unlabelled test split).
      line: the row's line number in the CSV file (the header is line 1).
    """

    filename: str
    label: str | None
    line: int


@dataclasses.dataclass(frozen=True)
class Issue:
    """One bad row or image, as a person would want it reported.

    Attributes:
      kind: a stable tag: ``malformed_row``, ``empty_filename``, ``bad_filename``,
        ``empty_label``, ``duplicate_row``, ``conflicting_labels``, ``label_variant``,
        ``unknown_label``, ``missing_file``, ``unreadable_image``, ``singleton_label``.
      split: ``"train"`` or ``"test"``.
      filename: the image concerned (None when the row has none).
      line: the CSV line (None when not tied to one row).
      message: a full sentence naming the CSV file, line and image.
    """

    kind: str
    split: str
    filename: str | None
    line: int | None
    message: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CsvTable:
    """A CSV file as read: its header, its good rows and the faults found in the others.

    Attributes:
      path: the CSV file.
      columns: the header, as written.
      extra_columns: header columns the layout does not use (ignored, but reported).
      num_rows: data rows, blank lines excluded.
      entries: the rows with no fault (first occurrence of an exact duplicate included).
      issues: one per faulty row.
    """

    path: Path
    columns: tuple[str, ...]
    extra_columns: tuple[str, ...]
    num_rows: int
    entries: tuple[Entry, ...]
    issues: tuple[Issue, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checked Kaggle-layout directory.

    Attributes:
      root: the data directory.
      train: good labelled rows, in CSV order.
      test: good unlabelled rows, in CSV order (empty when there is no ``Testing_set.csv``).
      issues: every row-level fault found, train first.
      classes: sorted label names of the good training rows.
      train_table: the parsed ``Training_set.csv``.
      test_table: the parsed ``Testing_set.csv`` (None if absent).
    """

    root: Path
    train: tuple[Entry, ...]
    test: tuple[Entry, ...]
    issues: tuple[Issue, ...]
    classes: tuple[str, ...]
    train_table: CsvTable
    test_table: CsvTable | None

    def image_path(self, split: str, filename: str) -> Path:
        """The path of ``filename`` in ``split`` ("train" or "test")."""
        return self.root / (TRAIN_DIR if split == "train" else TEST_DIR) / filename


def normalise_label(label: str) -> str:
    """The key under which spellings of one class collide: "Using Laptop" -> "using_laptop"."""
    return re.sub(r"[\s\-]+", "_", label.strip().casefold())


def _found_below_hint(path: Path) -> str:
    """Where ``path``'s file is one or two folders further down, as a hint; else "".

    Unzipping the Kaggle archive may add a folder (``Human Action Recognition/``) between the
    directory a user names and the layout.
    """
    below = sorted(
        {p.parent for pattern in ("*", "*/*") for p in path.parent.glob(f"{pattern}/{path.name}")}
    )
    if not below:
        return ""
    where = ", ".join(f"'{d}'" for d in below[:3]) + (" ..." if len(below) > 3 else "")
    return f". {path.name} is in {where}: use that folder as the data directory (--data-dir)"


def read_table(path: Path, columns: Sequence[str], *, split: str) -> CsvTable:
    """Reads one layout CSV and sorts its rows into good entries and issues.

    Args:
      path: the CSV file.
      columns: the columns it must have (``TRAIN_COLUMNS`` or ``TEST_COLUMNS``).
      split: "train" or "test", for the issues.

    Returns:
      The table. Row faults found here: malformed rows, empty or path-like filenames, empty
      labels, exact duplicate rows (later copies), and one filename given different labels
      (every copy).

    Raises:
      DataError: the file is missing, unreadable, empty, or lacks a required column.
    """
    if not path.is_file():
        raise DataError(
            f"{path} not found. Expected the Kaggle layout: Training_set.csv (filename,label), "
            "Testing_set.csv (filename), train/Image_N.jpg, test/Image_N.jpg"
            + _found_below_hint(path)
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror or e}") from e
    save_as = "save it as UTF-8 (in Excel: CSV UTF-8)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; {save_as}")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 (byte {data[e.start]:#04x}; Latin-1 or another "
            f"legacy encoding?); {save_as}"
        ) from None
    rows = _csv_rows(path, text)
    # Blank lines before the header (as after the data) hold nothing: the header is the first
    # line with text, and line numbers stay the file's.
    first = next((i for i, (_, row) in enumerate(rows) if any(c.strip() for c in row)), None)
    if first is None:
        raise DataError(f"{path} is empty; it needs a header line: {','.join(columns)}")
    # Header names in any case ("Filename,Label" from a spreadsheet).
    header = tuple(cell.strip().lower() for cell in rows[first][1])
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{path} has columns {list(header)} but lacks {missing}; "
            f"the header must be: {','.join(columns)}"
        )
    extra = tuple(c for c in header if c not in columns)
    if extra:
        log.warning("%s: ignoring extra columns %s", path, list(extra))
    where = {c: header.index(c) for c in columns}
    name = path.name

    entries: list[Entry] = []
    issues: list[Issue] = []
    num_rows = 0
    for line, row in rows[first + 1 :]:
        if not any(cell.strip() for cell in row):
            continue  # Blank lines (a trailing newline, an empty spreadsheet row) hold no data.
        num_rows += 1
        keys = [row[where[c]] for c in columns if where[c] < len(row)]
        if any("\n" in k or "\r" in k for k in keys):
            # No file name or label spans lines: a quote opened on this line was never closed,
            # and every row after it was read into this one field.
            raise DataError(
                f"{path} line {line}: the quote opened on this line is not closed, so the "
                f"lines after it read as part of one field ({row!r:.120}); close or remove it"
            )
        if len(row) != len(header):
            issues.append(
                Issue("malformed_row", split, None, line,
                      f"{name} line {line}: {len(row)} fields for {len(header)} columns: "
                      f"{row!r:.120}")
            )  # fmt: skip
            continue
        filename = row[where["filename"]].strip()
        label = row[where["label"]].strip() if "label" in where else None
        if not filename:
            issues.append(
                Issue("empty_filename", split, None, line, f"{name} line {line}: empty filename")
            )
            continue
        if "/" in filename or "\\" in filename or filename in (".", ".."):
            issues.append(
                Issue("bad_filename", split, filename, line,
                      f"{name} line {line}: {filename!r} is not a plain file name "
                      f"inside {split}/")
            )  # fmt: skip
            continue
        if label is not None and not label:
            issues.append(
                Issue("empty_label", split, filename, line,
                      f"{name} line {line}: {filename} has an empty label")
            )  # fmt: skip
            continue
        entries.append(Entry(filename, label, line))

    entries, dup_issues = _drop_duplicates(entries, name, split)
    issues.extend(dup_issues)
    issues.sort(key=lambda i: i.line or 0)
    return CsvTable(path, header, extra, num_rows, tuple(entries), tuple(issues))


def is_blank_csv(path: Path) -> bool:
    """True when ``path`` is a file of nothing but white space and byte-order marks.

    What an empty spreadsheet export holds: for the optional Testing_set.csv, the same as no
    file (no test split). False when it cannot be read (reading it then says why).
    """
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return not data.replace(b"\xef\xbb\xbf", b"").strip()


def _csv_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """The CSV's rows, each with the file line it starts on (a quoted field may span lines).

    skipinitialspace: `"Image_1.jpg", "calling"` is two quoted fields, as spreadsheets and
    pandas read it, not a label with quote characters in it.

    Raises:
      DataError: the csv module cannot read a row (a field over its size limit, as when an
        unclosed quote swallows the rest of a large file), naming the line the row starts on.
    """
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(
            f"{path} line {start}: cannot read this row ({e}); a quote opened on this line and "
            "never closed makes the rest of the file one field: close or remove it"
        ) from None
    return rows


def _drop_duplicates(
    entries: list[Entry], name: str, split: str
) -> tuple[list[Entry], list[Issue]]:
    by_file: dict[str, list[Entry]] = collections.defaultdict(list)
    for e in entries:
        by_file[e.filename].append(e)
    issues: list[Issue] = []
    bad: set[int] = set()
    for filename, group in by_file.items():
        if len(group) == 1:
            continue
        labels = {e.label for e in group}
        if len(labels) > 1:
            # Which label is right cannot be known; every copy goes.
            detail = ", ".join(f"line {e.line}: {e.label!r}" for e in group)
            for e in group:
                bad.add(e.line)
                issues.append(
                    Issue("conflicting_labels", split, filename, e.line,
                          f"{name} line {e.line}: {filename} has conflicting labels ({detail})")
                )  # fmt: skip
        else:
            first = group[0]
            for e in group[1:]:
                bad.add(e.line)
                issues.append(
                    Issue("duplicate_row", split, filename, e.line,
                          f"{name} line {e.line}: duplicate of line {first.line} ({filename})")
                )  # fmt: skip
    return [e for e in entries if e.line not in bad], issues


def label_issues(
    entries: Sequence[Entry], name: str, expected: Iterable[str] | None
) -> list[Issue]:
    """Rows whose label is a spelling variant of a more frequent one, or outside ``expected``.

    Args:
      entries: labelled rows.
      name: the CSV's name, for messages.
      expected: the allowed labels, or None to allow any.

    Returns:
      ``label_variant`` and ``unknown_label`` issues, one per row.
    """
    counts = collections.Counter(e.label for e in entries)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for label in counts:
        groups[normalise_label(label)].append(label)
    canonical: dict[str, str] = {}
    for spellings in groups.values():
        # The most used spelling is taken as the intended one (ties: alphabetical).
        best = min(spellings, key=lambda s: (-counts[s], s))
        for s in spellings:
            if s != best:
                canonical[s] = best
    expected_set = set(expected) if expected is not None else None
    issues = []
    for e in entries:
        if e.label in canonical:
            best = canonical[e.label]
            issues.append(
                Issue("label_variant", "train", e.filename, e.line,
                      f"{name} line {e.line}: label {e.label!r} of {e.filename} looks like a "
                      f"misspelling of {best!r} ({counts[best]} rows)")
            )  # fmt: skip
        elif expected_set is not None and e.label not in expected_set:
            issues.append(
                Issue("unknown_label", "train", e.filename, e.line,
                      f"{name} line {e.line}: unknown label {e.label!r} of {e.filename}; "
                      f"expected one of {sorted(expected_set)}")
            )  # fmt: skip
    return issues


def singleton_labels(entries: Sequence[Entry]) -> list[Issue]:
    """``singleton_label`` issues: the rows whose label no other row has (a stratified split
    needs at least two images of a class), in CSV order."""
    counts = collections.Counter(e.label for e in entries)
    return [
        Issue("singleton_label", "train", e.filename, e.line,
              f"{TRAIN_CSV} line {e.line}: label {e.label!r} has a single image ({e.filename}); "
              "a stratified split needs at least two")
        for e in entries
        if counts[e.label] < 2
    ]  # fmt: skip


def read_layout(
    data_dir: str | Path,
    *,
    expected_classes: Iterable[str] | None = None,
    check_files: bool = True,
) -> Layout:
    """Reads and checks a Kaggle-layout directory, without opening any image.

    Args:
      data_dir: the directory holding ``Training_set.csv`` and ``train/`` (and optionally
        ``Testing_set.csv`` and ``test/``).
      expected_classes: when given, training labels outside it are ``unknown_label`` issues
        (e.g. the classes a run was started with).
      check_files: also report rows whose image file does not exist (``missing_file``).

    Returns:
      The layout; ``issues`` lists every faulty row, which ``train``/``test`` exclude.

    Raises:
      DataError: the directory or a CSV is missing, empty, or lacks its columns, or the
        training CSV has no usable row.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    train_table = read_table(root / TRAIN_CSV, TRAIN_COLUMNS, split="train")
    if train_table.num_rows == 0:
        raise DataError(f"{train_table.path} has a header but no rows")
    test_path = root / TEST_CSV
    test_table = None
    if test_path.is_file() and not is_blank_csv(test_path):
        test_table = read_table(test_path, TEST_COLUMNS, split="test")
    else:
        # An empty Testing_set.csv says as much as an absent one: there is no test split.
        why = "is empty" if test_path.is_file() else "not found"
        log.warning("%s %s: the test split will be empty", test_path, why)

    issues = list(train_table.issues)
    bad_labels = label_issues(train_table.entries, TRAIN_CSV, expected_classes)
    issues.extend(bad_labels)
    bad_lines = {i.line for i in bad_labels}
    train = [e for e in train_table.entries if e.line not in bad_lines]
    test = list(test_table.entries) if test_table else []
    if test_table:
        issues.extend(test_table.issues)

    if check_files:
        missing = missing_files(root, "train", train) + missing_files(root, "test", test)
        issues.extend(missing)
        gone = {(i.split, i.line) for i in missing}
        train = [e for e in train if ("train", e.line) not in gone]
        test = [e for e in test if ("test", e.line) not in gone]

    if not train and not issues:
        raise DataError(f"{train_table.path} has no usable rows")
    classes = tuple(sorted({e.label for e in train}))
    return Layout(root, tuple(train), tuple(test), tuple(issues), classes, train_table, test_table)


def missing_files(root: Path, split: str, entries: Sequence[Entry]) -> list[Issue]:
    """``missing_file`` issues for the rows of ``split`` whose image is not a file under root.

    Each names what is there instead when that explains it: a directory of that name, the name
    in another case or Unicode normalisation (``Image_1.JPG``; macOS zips store decomposed
    accents), or the file one folder down (``train/train/``).
    """
    folder, csv_name = (TRAIN_DIR, TRAIN_CSV) if split == "train" else (TEST_DIR, TEST_CSV)
    missing = [e for e in entries if not (root / folder / e.filename).is_file()]
    if not missing:
        return []
    base = root / folder
    on_disk: dict[str, str] = {}  # comparable form -> the name on disk
    below: dict[str, str] = {}  # file name one folder down -> that folder
    for p in base.iterdir() if base.is_dir() else ():
        on_disk.setdefault(unicodedata.normalize("NFC", p.name).casefold(), p.name)
        if p.is_dir():
            below.update({f.name: p.name for f in p.iterdir() if f.is_file()})

    def why(filename: str) -> str:
        if (base / filename).is_dir():
            return "is a directory, not an image file"
        other = on_disk.get(unicodedata.normalize("NFC", filename).casefold())
        if other is not None and other != filename:
            return f"does not exist, but {folder}/{other} does (rename one to match the other)"
        if filename in below:
            return (
                f"does not exist, but {folder}/{below[filename]}/{filename} does (move the "
                f"images up into {folder}/)"
            )
        return "does not exist"

    return [
        Issue("missing_file", split, e.filename, e.line,
              f"{csv_name} line {e.line}: {folder}/{e.filename} {why(e.filename)}")
        for e in missing
    ]  # fmt: skip


def list_issues(issues: Sequence[Issue]) -> str:
    """The first few of ``issues`` in full, one indented line each, then how many more."""
    lines = [f"  {i.message}" for i in issues[:_MAX_LISTED]]
    if len(issues) > _MAX_LISTED:
        lines.append(f"  ... and {len(issues) - _MAX_LISTED} more")
    return "\n".join(lines)


def raise_issues(issues: Sequence[Issue], *, what: str, unread: Sequence[Issue] = ()) -> None:
    """Raises one DataError listing ``issues`` (the first few in full), or returns if none.

    Args:
      issues: the problems that stop the command.
      what: what they are ("bad rows or images").
      unread: problems of the test split, which training does not read: listed after the
        others, so that one run names every problem of the data set, but they do not stop it.
    """
    if issues:
        also = (
            f"\nAlso {len(unread)} in the test split, which training does not read (har-evaluate "
            f"refuses them):\n{list_issues(unread)}"
            if unread
            else ""
        )
        raise DataError(
            f"{len(issues)} {what}:\n{list_issues(issues)}{also}\nTo go on: {SKIP_HINT}"
        )
