"""``har-explore``: Phase 1 report of a Kaggle-layout data set (JSON, Markdown and a PNG chart).

Lists the CSV structure and anomalies, the class distribution, missing and unreadable images and
image size statistics; see :mod:`har_flax.data.explore`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from har_flax.cli import out_dir_problem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="har-explore",
        description="Explore a data set in the Kaggle HAR layout and report what is wrong with it.",
        epilog="Example: har-explore --data-dir data/har --out reports/explore",
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="directory with Training_set.csv, Testing_set.csv, train/ and test/",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="directory for explore.json/.md/.png"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="threads that open images (default: CPUs)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when any anomaly is found (for CI)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns 0 (report written), 1 (--strict and anomalies), 2 (usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if problem := out_dir_problem("--out", args.out):
        parser.error(problem)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from har_flax.data import explore  # noqa: PLC0415 (--help answers without the imports)

    start = time.perf_counter()
    try:
        report = explore.explore(args.data_dir, workers=args.workers)
        paths = explore.write_report(report, args.out)
    except OSError as e:  # Unwritable --out, disk full.
        print(f"har-explore: error: {e}", file=sys.stderr)
        return 1
    c = report["classes"]
    n_images = sum(s["listed"] for s in report["images"].values())
    counts = report["anomaly_counts"]  # structural (bad_csv) ones included
    n_anom = sum(counts.values())
    print(
        f"{n_images} images listed, {c['count']} classes, {n_anom} anomalies "
        f"({', '.join(f'{k}: {v}' for k, v in counts.items()) or 'none'}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    for err in report["structural_errors"]:
        print(f"  {err['message']}")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 1 if args.strict and n_anom else 0


if __name__ == "__main__":
    sys.exit(main())
