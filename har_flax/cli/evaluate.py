"""``har-evaluate``: metrics of a run's best model, a Kaggle submission and a linear-probe baseline.

Writes ``report.json``, ``report.md``, ``confusion_matrix.png``, ``per_class.png`` and
``submission.csv`` to ``--out``; see :mod:`har_flax.evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from har_flax.cli import out_dir_problem, print_skipped

PROBE_NAMES = ("tflite", "none")
# How har-evaluate skips bad data, in the place of har-train's "set data.skip_bad_images=true".
SKIP_FLAG = "--skip-bad-images"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="har-evaluate",
        description="Evaluate a trained run on its validation split and write a report.",
        epilog="Example: har-evaluate --workdir runs/har --data-dir data/har --out reports/har",
    )
    parser.add_argument("--workdir", required=True, type=Path, help="the run directory W")
    parser.add_argument(
        "--data-dir", required=True, type=Path, help="the Kaggle-layout data the run used"
    )
    parser.add_argument("--out", required=True, type=Path, help="report directory R")
    parser.add_argument(
        "--model", type=Path, default=None, help="model directory (default: W/model, the best)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch size")
    parser.add_argument(
        "--probe",
        default="tflite",
        help="linear-probe backbone weights: tflite (bundled ImageNet), a ported directory or "
        "weight file, or none to skip the baseline",
    )
    parser.add_argument(
        "--download-dir", type=Path, default=None, help="prepared-array cache used by har-train"
    )
    parser.add_argument(
        SKIP_FLAG,
        action="store_true",
        help="skip bad CSV rows and unreadable images instead of stopping (data.skip_bad_images); "
        "they are listed on stderr and in the report, and test images left out have no row in "
        "submission.csv",
    )
    return parser


def _usage_problems(args: argparse.Namespace) -> list[str]:
    """Every flag that cannot work, found before any model or image is read."""
    problems = []
    if not args.workdir.is_dir():
        problems.append(f"--workdir {args.workdir} is not a directory (train first with har-train)")
    if not args.data_dir.is_dir():
        problems.append(f"--data-dir {args.data_dir} is not a directory")
    if args.model is not None and not args.model.is_dir():
        problems.append(
            f"--model {args.model} is not a directory (a model directory: W/model of a run)"
        )
    if args.probe not in PROBE_NAMES and not Path(args.probe).exists():
        problems.append(
            f"--probe {args.probe}: no such file or directory; give tflite (the bundled "
            "ImageNet weights), none (no baseline), a directory written by har-port-weights, "
            "or a .tflite or Keras .h5 file"
        )
    problems.append(out_dir_problem("--out", args.out))
    if args.download_dir is not None:
        problems.append(out_dir_problem("--download-dir", args.download_dir))
    if args.batch_size is not None and args.batch_size < 1:
        problems.append("--batch-size must be at least 1")
    return [p for p in problems if p]


def main(argv: list[str] | None = None) -> int:
    """Evaluates; returns 0 (report written), 1 (bad model/data), 2 (usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if problems := _usage_problems(args):
        parser.error("; ".join(problems))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from har_flax import evaluate  # noqa: PLC0415 (--help answers without importing JAX)
    from har_flax.checkpoint import CheckpointError, load_model
    from har_flax.data import DataError, kaggle, load_splits

    try:
        model_dir = args.model or args.workdir / "model"
        config, _, _ = load_model(model_dir)
        data_config = config.data
        if args.skip_bad_images:
            data_config = dataclasses.replace(data_config, skip_bad_images=True)
        splits = load_splits(
            args.data_dir,
            args.workdir,
            image_size=config.model.image_size,
            data_config=data_config,
            download_dir=args.download_dir,
            evaluating=True,
        )
        why = SKIP_FLAG if args.skip_bad_images else "the run's data.skip_bad_images"
        print_skipped(
            "har-evaluate", splits.skipped, why, "; they are in no metric and listed in the report"
        )
        report = evaluate.evaluate(
            args.workdir,
            args.data_dir,
            args.out,
            model_dir=model_dir,
            splits=splits,
            batch_size=args.batch_size,
            probe=args.probe,
        )
    except (CheckpointError, DataError, ValueError, OSError) as e:
        # The library's hint names har-train's setting; this command has a flag for it.
        message = str(e).replace(kaggle.SKIP_HINT, kaggle.skip_hint(f"rerun with {SKIP_FLAG}"))
        print(f"har-evaluate: error: {message}", file=sys.stderr)
        return 1
    sub = report["submission"]
    if sub and sub["missing"]:
        missing = sub["missing"]
        shown = ", ".join(missing[:20])
        if len(missing) > 20:
            shown += f" ... and {len(missing) - 20} more (all in {evaluate.REPORT_JSON})"
        print(
            f"har-evaluate: warning: {len(missing)} of the {sub['testing_set_rows']} "
            f"Testing_set.csv rows have no row in {evaluate.SUBMISSION_CSV} (skipped as bad: "
            "no label is made up for them); Kaggle expects one row per Testing_set.csv row. "
            f"Missing: {shown}",
            file=sys.stderr,
        )
    m = report["model"]
    line = f"validation accuracy {m['accuracy']:.4f}, macro F1 {m['macro_avg']['f1']:.4f}"
    if "linear_probe" in report:
        line += f"; linear probe {report['linear_probe']['metrics']['accuracy']:.4f}"
    print(line)
    extra = ", ".join([".json", "PNGs"] + ([sub["file"]] if sub and sub["file"] else []))
    print(f"wrote {args.out / evaluate.REPORT_MD} (+ {extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
