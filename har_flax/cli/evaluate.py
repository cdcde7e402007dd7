"""``har-evaluate``: metrics of a run's best model, a Kaggle submission and a linear-probe baseline.

Writes ``report.json``, ``report.md``, ``confusion_matrix.png``, ``per_class.png`` and
``submission.csv`` to ``--out``; see :mod:`har_flax.evaluate`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluates; returns 0 (report written), 1 (bad model/data), 2 (usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} is not a directory (train first with har-train)")
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from har_flax import evaluate  # noqa: PLC0415 (--help answers without importing JAX)
    from har_flax.checkpoint import CheckpointError, load_model
    from har_flax.data import DataError, load_splits

    try:
        model_dir = args.model or args.workdir / "model"
        config, _, _ = load_model(model_dir)
        splits = load_splits(
            args.data_dir,
            args.workdir,
            image_size=config.model.image_size,
            data_config=config.data,
            download_dir=args.download_dir,
        )
        report = evaluate.evaluate(
            args.workdir,
            None,
            args.out,
            model_dir=model_dir,
            splits=splits,
            batch_size=args.batch_size,
            probe=args.probe,
        )
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"har-evaluate: error: {e}", file=sys.stderr)
        return 1
    m = report["model"]
    line = f"validation accuracy {m['accuracy']:.4f}, macro F1 {m['macro_avg']['f1']:.4f}"
    if "linear_probe" in report:
        line += f"; linear probe {report['linear_probe']['metrics']['accuracy']:.4f}"
    print(line)
    print(f"wrote {args.out / evaluate.REPORT_MD} (+ .json, PNGs, submission.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
