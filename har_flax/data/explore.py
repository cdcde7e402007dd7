"""Phase 1, exploring a Kaggle-layout data set: what is there and what is wrong with it.

:func:`explore` reads both CSVs and opens every listed image once (in a thread pool): CSV
structure and anomalies, class distribution, missing and unreadable images, files no CSV lists,
image size, aspect, mode and format statistics. :func:`write_report` saves it as
``explore.json``, ``explore.md`` and ``explore.png``, each written atomically.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm
from PIL import Image

from har_flax import images
from har_flax.config import HAR_ACTIONS
from har_flax.data import kaggle

log = logging.getLogger(__name__)

JSON_FILE = "explore.json"
MARKDOWN_FILE = "explore.md"
CHART_FILE = "explore.png"
# Long lists are cut in the Markdown (the JSON has them all).
_MD_LIST = 30


def _probe(path: Path) -> dict[str, Any]:
    """Whether one image file decodes as training decodes it, and if so its statistics.

    Returns:
      ``{"error": reason}`` for a file training cannot read; else ``bytes``, ``width`` and
      ``height`` as training sees them (EXIF orientation applied), ``mode`` and ``format``.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        return {"error": f"cannot be read ({e.strerror or e})"}
    try:
        # The same decoding as training: unreadable here = unreadable there.
        frame = images.first_frame_of_file(data, field=f"{path.parent.name}/{path.name}")
    except images.ImageError as e:
        return {"error": e.reason}
    # (H, W, 3), upright: an orientation-6 photo stored 80x60 is 60 wide, as the model gets it.
    info: dict[str, Any] = {"bytes": len(data), "width": frame.shape[1], "height": frame.shape[0]}
    try:
        with Image.open(io.BytesIO(data)) as im:
            info.update(mode=im.mode, format=im.format)
    except Exception:  # noqa: BLE001 (it decoded above; only the header's labels are missing)
        info.update(mode="?", format="?")
    return info


def _displayable(text: str) -> str:
    """``text`` with the bytes of a name that is not UTF-8 shown as U+FFFD.

    Python reads such a file name (a Latin-1 ``caf\\xe9.jpg`` from an old zip) with surrogate
    characters, which UTF-8 files and terminals cannot hold.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # A surrogate that stands for no byte.
        return text.encode("utf-8", "replace").decode("utf-8")


def _displayable_all(value: Any) -> Any:
    """``value`` (the report) with every string :func:`_displayable`."""
    if isinstance(value, str):
        return _displayable(value)
    if isinstance(value, dict):
        return {_displayable_all(k): _displayable_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayable_all(v) for v in value]
    return value


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": float(a.min()),
        "p05": float(np.percentile(a, 5)),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


def _hist(values: Sequence[float], bins: int = 20) -> dict[str, list] | None:
    if not len(values):
        return None
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def _table_summary(
    root: Path, name: str, columns: Sequence[str], split: str
) -> tuple[dict[str, Any], kaggle.CsvTable | None]:
    path = root / name
    summary: dict[str, Any] = {"file": name, "present": path.is_file(), "required": list(columns)}
    try:
        table = kaggle.read_table(path, columns, split=split)
    except kaggle.DataError as e:
        summary["error"] = str(e)
        return summary, None
    summary.update(
        columns=list(table.columns),
        extra_columns=list(table.extra_columns),
        rows=table.num_rows,
        usable_rows=len(table.entries),
        issue_rows=len(table.issues),
    )
    return summary, table


def explore(data_dir: str | Path, *, workers: int | None = None) -> dict[str, Any]:
    """Examines a Kaggle-layout directory.

    Args:
      data_dir: the directory with ``Training_set.csv``, ``Testing_set.csv``, ``train/``,
        ``test/``.
      workers: threads that open images (default: one per CPU).

    Returns:
      A JSON-able report: ``csv`` (per file: columns, rows, structural error or note),
      ``notes`` (what is not a fault: an absent or blank ``Testing_set.csv``, which training
      reads as no test split), ``structural_errors`` (a CSV missing, empty, without its columns
      or without rows: kind ``bad_csv``, file, message naming the file), ``anomalies`` (every
      faulty row or image, and every file whose name is not UTF-8: kind, split, filename, line,
      message), ``anomaly_counts`` (per kind, of both lists), ``classes`` (counts, imbalance,
      labels outside the 15 HAR actions when the data looks like the HAR set), ``images`` (per
      split: listed, readable, missing, unreadable, unlisted files) and ``sizes`` (of the
      images training can read, as it sees them, EXIF orientation applied: width, height,
      aspect statistics, common sizes, modes, formats). Names that are not UTF-8 are shown with
      U+FFFD for their bad bytes.

    Raises:
      DataError: ``data_dir`` is not a directory.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise kaggle.DataError(f"data directory {root} does not exist")
    train_csv, train_table = _table_summary(root, kaggle.TRAIN_CSV, kaggle.TRAIN_COLUMNS, "train")
    notes: list[str] = []
    test_path = root / kaggle.TEST_CSV
    if test_path.is_file() and not kaggle.is_blank_csv(test_path):
        test_csv, test_table = _table_summary(root, kaggle.TEST_CSV, kaggle.TEST_COLUMNS, "test")
    else:
        # Optional: an absent or empty one is no test split, as kaggle.read_layout reads it.
        why = "is empty" if test_path.is_file() else "not found"
        note = (
            f"{test_path} {why}: no test split, as training will read it (to have one, add "
            f"{kaggle.TEST_CSV} with a header line 'filename' and one test image per row)"
        )
        log.warning("%s", note)
        notes.append(note)
        test_csv = {"file": kaggle.TEST_CSV, "present": test_path.is_file(),
                    "required": list(kaggle.TEST_COLUMNS), "note": note}  # fmt: skip
        test_table = None
    anomalies: list[kaggle.Issue] = []
    structural = [
        {"kind": "bad_csv", "file": s["file"], "message": s["error"]}
        for s in (train_csv, test_csv)
        if "error" in s
    ]
    if train_table is not None and train_table.num_rows == 0:
        # The words har-train stops with (kaggle.read_layout), the file named.
        structural.append(
            {"kind": "bad_csv", "file": kaggle.TRAIN_CSV,
             "message": f"{train_table.path} has a header but no rows"}
        )  # fmt: skip

    entries = {"train": [], "test": []}
    for split, table in (("train", train_table), ("test", test_table)):
        if table is not None:
            anomalies.extend(table.issues)
            entries[split] = list(table.entries)

    # Labels: spelling variants always; unknown ones against the HAR set when the data is HAR.
    labels = [e.label for e in entries["train"]]
    distinct = set(labels)
    looks_har = len(distinct & set(HAR_ACTIONS)) > len(distinct) / 2
    label_problems = kaggle.label_issues(
        entries["train"], kaggle.TRAIN_CSV, HAR_ACTIONS if looks_har else None
    )
    anomalies.extend(label_problems)
    counts = collections.Counter(labels)
    anomalies.extend(kaggle.singleton_labels(entries["train"]))  # the words training stops with

    # Images: every listed file opened once; unlisted files in the folders noted.
    image_summary: dict[str, Any] = {}
    sizes: list[tuple[int, int]] = []
    modes: collections.Counter = collections.Counter()
    formats: collections.Counter = collections.Counter()
    file_bytes: list[int] = []
    workers = workers or os.cpu_count() or 1
    for split in ("train", "test"):
        folder = kaggle.TRAIN_DIR if split == "train" else kaggle.TEST_DIR
        csv_name = kaggle.TRAIN_CSV if split == "train" else kaggle.TEST_CSV
        missing = kaggle.missing_files(root, split, entries[split])
        anomalies.extend(missing)
        gone = {i.line for i in missing}
        present = [e for e in entries[split] if e.line not in gone]
        paths = [root / folder / e.filename for e in present]
        unreadable = []
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = pool.map(_probe, paths)
            bar = tqdm.tqdm(results, total=len(present), desc=f"Reading {split} images", unit="img")
            for e, info in zip(present, bar, strict=True):
                if "width" in info:
                    sizes.append((info["width"], info["height"]))
                    modes[info["mode"]] += 1
                    formats[info["format"]] += 1
                    file_bytes.append(info["bytes"])
                if "error" in info:
                    issue = kaggle.Issue("unreadable_image", split, e.filename, e.line,
                                         f"{csv_name} line {e.line}: {folder}/{e.filename} is "
                                         f"unreadable: {info['error']}")  # fmt: skip
                    anomalies.append(issue)
                    unreadable.append({"filename": e.filename, "reason": info["error"]})
        table = train_table if split == "train" else test_table
        # Named by any row, faulty or not: only files no row mentions are "unlisted".
        listed = {e.filename for e in entries[split]} | {
            i.filename for i in (table.issues if table else ()) if i.filename
        }
        on_disk = (
            sorted(p.name for p in (root / folder).iterdir()) if (root / folder).is_dir() else []
        )
        for name in on_disk:
            if not _is_utf8(name):
                # No CSV (read as UTF-8) can name it, and no report can print it as it is.
                anomalies.append(
                    kaggle.Issue("bad_filename", split, _displayable(name), None,
                                 f"{folder}/{_displayable(name)}: its name is not UTF-8 (bytes "
                                 f"{os.fsencode(name)!r}, from an old zip tool in Latin-1 or "
                                 f"another legacy encoding?), so no CSV can list it; rename it "
                                 f"to a UTF-8 name")
                )  # fmt: skip
        image_summary[split] = {
            "folder": folder,
            "folder_present": (root / folder).is_dir(),
            "listed": len(entries[split]),
            "readable": len(present) - len(unreadable),
            "missing": [i.filename for i in missing],
            "unreadable": unreadable,
            "unlisted_files": [n for n in on_disk if n not in listed],
        }

    # What har-train stops on besides faulty rows: fewer than two classes left to tell apart.
    bad_lines = {i.line for i in anomalies if i.split == "train"}
    usable = {e.label for e in entries["train"] if e.line not in bad_lines}
    if train_table is not None and train_table.num_rows and len(usable) < 2:
        structural.append(
            {"kind": "too_few_classes", "file": kaggle.TRAIN_CSV,
             "message": f"{kaggle.TRAIN_CSV}: training needs at least two classes with usable "
                        f"images, found {sorted(usable)}"}
        )  # fmt: skip

    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    n_min = min(counts.values()) if counts else 0
    report = {
        "data_dir": os.fspath(root),
        "ok": not (anomalies or structural),
        "csv": {"train": train_csv, "test": test_csv},
        "notes": notes,
        "structural_errors": structural,
        "anomalies": [i.to_dict() for i in sorted(anomalies, key=_issue_order)],
        "anomaly_counts": dict(
            collections.Counter([s["kind"] for s in structural] + [i.kind for i in anomalies])
        ),
        "classes": {
            "count": len(counts),
            "counts": dict(sorted(counts.items())),
            "looks_like_har": looks_har,
            "har_actions_absent": sorted(set(HAR_ACTIONS) - distinct) if looks_har else [],
            "imbalance_ratio": (max(counts.values()) / n_min) if n_min else None,
        },
        "images": image_summary,
        "sizes": {
            "count": len(sizes),
            "width": _stats(widths),
            "height": _stats(heights),
            "aspect": _stats([w / h for w, h in sizes]),
            "file_kib": _stats([b / 1024 for b in file_bytes]),
            "histograms": {
                "width": _hist(widths),
                "height": _hist(heights),
                "aspect": _hist([w / h for w, h in sizes]),
            },
            "common_sizes": [
                {"width": w, "height": h, "count": n}
                for (w, h), n in collections.Counter(sizes).most_common(10)
            ],
            "modes": dict(modes.most_common()),
            "formats": dict(formats.most_common()),
        },
    }
    # Names and paths from the disk may not be UTF-8; the report shows them, it cannot hold them.
    return _displayable_all(report)


def _issue_order(i: kaggle.Issue) -> tuple:
    return (i.split != "train", i.line or 0, i.kind)


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (long lists cut; the JSON has everything)."""
    out = [f"# Data exploration: `{report['data_dir']}`", ""]
    n_anom = len(report["anomalies"]) + len(report["structural_errors"])
    out += ["**No anomalies found.**" if report["ok"] else f"**{n_anom} anomalies found.**", ""]
    out += ["## CSV files", "", "| file | columns | rows | usable | faulty | note |",
            "| --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for s in report["csv"].values():
        if "error" in s or "note" in s:
            out.append(f"| {s['file']} | | | | | {_md(s.get('error') or s['note'])} |")
        else:
            note = f"extra columns ignored: {s['extra_columns']}" if s["extra_columns"] else ""
            out.append(
                f"| {s['file']} | {','.join(s['columns'])} | {s['rows']} | {s['usable_rows']} "
                f"| {s['issue_rows']} | {note} |"
            )
    c = report["classes"]
    total = sum(c["counts"].values()) or 1
    out += ["", f"## Classes ({c['count']})", ""]
    if c["imbalance_ratio"]:
        out += [f"Largest / smallest class: {c['imbalance_ratio']:.2f}", ""]
    if c["har_actions_absent"]:
        out += [f"HAR actions with no image: {', '.join(c['har_actions_absent'])}", ""]
    out += ["| label | images | share |", "| --- | ---: | ---: |"]
    out += [f"| {_md(k)} | {v} | {v / total:.1%} |" for k, v in c["counts"].items()]
    out += ["", "## Images", "", "| split | listed | readable | missing | unreadable | unlisted |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for split, s in report["images"].items():
        out.append(
            f"| {split} | {s['listed']} | {s['readable']} | {len(s['missing'])} "
            f"| {len(s['unreadable'])} | {len(s['unlisted_files'])} |"
        )
    sz = report["sizes"]
    if sz["count"]:
        out += ["", f"## Image sizes ({sz['count']} images)", ""]
        out += ["| | min | p5 | median | mean | p95 | max |", "| --- |" + " ---: |" * 6]
        for key, label in (("width", "width px"), ("height", "height px"),
                           ("aspect", "aspect w/h"), ("file_kib", "file KiB")):  # fmt: skip
            st = sz[key]
            out.append(
                f"| {label} | "
                + " | ".join(f"{st[k]:.2f}" for k in ("min", "p05", "median", "mean", "p95", "max"))
                + " |"
            )
        repeated = [x for x in sz["common_sizes"] if x["count"] > 1]
        common = ", ".join(f"{x['width']}x{x['height']} ({x['count']})" for x in repeated)
        out += ["", f"Most common sizes: {common}" if common else "No two images share a size.", ""]
        out += [f"Modes: {sz['modes']}; formats: {sz['formats']}"]
    out += ["", "## Anomalies", ""]
    problems = [f"- {_md(e['message'])}" for e in report["structural_errors"]]
    problems += [f"- `{a['kind']}`: {_md(a['message'])}" for a in report["anomalies"]]
    if not problems:
        out.append("None.")
    out += problems[:_MD_LIST]
    if len(problems) > _MD_LIST:
        out.append(f"- ... and {len(problems) - _MD_LIST} more (see {JSON_FILE})")
    for s in report["images"].values():
        if s["unlisted_files"]:
            names = ", ".join(s["unlisted_files"][:_MD_LIST])
            more = len(s["unlisted_files"]) - _MD_LIST
            out += ["", f"Files in `{s['folder']}/` no CSV lists: {names}"
                    + (f" ... and {more} more" if more > 0 else "")]  # fmt: skip
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_png(report: dict[str, Any]) -> bytes:
    """A chart: class counts, width and height histograms, aspect histogram. PNG bytes."""
    import matplotlib  # noqa: PLC0415 (only the report needs it)

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415

    counts = report["classes"]["counts"]
    fig = Figure(figsize=(15, 5), layout="constrained")
    ax_c, ax_s, ax_a = fig.subplots(1, 3)
    names = list(counts)
    ax_c.barh(names[::-1], [counts[n] for n in names][::-1], color="tab:blue")
    ax_c.set_title(f"Training images per class ({len(names)} classes)")
    ax_c.set_xlabel("images")
    hists = report["sizes"]["histograms"]
    for key, colour in (("width", "tab:green"), ("height", "tab:purple")):
        h = hists[key]
        if h:
            ax_s.stairs(h["counts"], h["edges"], label=key, color=colour)
    ax_s.set_title(f"Image sides ({report['sizes']['count']} images)")
    ax_s.set_xlabel("pixels")
    ax_s.set_ylabel("images")
    if hists["width"] or hists["height"]:  # No image read: no line, nothing to label.
        ax_s.legend()
    if hists["aspect"]:
        h = hists["aspect"]
        ax_a.stairs(h["counts"], h["edges"], fill=True, color="tab:orange")
        ax_a.axvline(1.0, color="grey", linewidth=0.8)
    ax_a.set_title("Aspect ratio (width / height)")
    ax_a.set_xlabel("aspect")
    ax_a.set_ylabel("images")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Writes ``explore.json``, ``explore.md`` and ``explore.png`` into ``out_dir`` atomically.

    Returns:
      {"json": path, "markdown": path, "chart": path}.
    """
    from har_flax.checkpoint import atomic_write_files  # noqa: PLC0415

    out = Path(out_dir)
    paths = {"json": out / JSON_FILE, "markdown": out / MARKDOWN_FILE, "chart": out / CHART_FILE}
    # All three made, then all written, before any replaces an earlier report's: a report that
    # fails to render or to write leaves the earlier one whole, or none.
    atomic_write_files({
        paths["json"]: (json.dumps(report, indent=2) + "\n").encode(),
        paths["markdown"]: to_markdown(report).encode(),
        paths["chart"]: to_png(report),
    })  # fmt: skip
    return paths
