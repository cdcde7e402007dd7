"""Writes a synthetic data set in the Kaggle HAR layout (for smoke runs without the real data).

python scripts/make_synthetic.py --out data/synthetic --classes calling,clapping,cycling
"""

import argparse
import sys
from pathlib import Path

from har_flax.data.synthetic import write_synthetic_kaggle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument(
        "--classes", default="calling,clapping,cycling", help="comma-separated class names"
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=100,
        help="labelled images per class (100: what the smoke run is tested on)",
    )
    parser.add_argument("--test-count", type=int, default=12)
    parser.add_argument("--min-size", type=int, default=48, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=120, help="largest image side (px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    try:
        root = write_synthetic_kaggle(
            args.out,
            classes=classes,
            train_per_class=args.train_per_class,
            test_count=args.test_count,
            min_size=args.min_size,
            max_size=args.max_size,
            seed=args.seed,
        )
    except ValueError as e:
        parser.error(str(e))
    print(
        f"wrote {root}: {len(classes)} classes x {args.train_per_class} training images, "
        f"{args.test_count} test images (hidden labels in test_labels.csv)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
