"""``har-predict``: classify image files with a model directory or the built-in ImageNet model.

Several images are one frame sequence (one answer); ``--each`` classifies them one by one. With
no image it classifies the bundled sample photo, so a fresh clone has something to show.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "samples" / "cat.jpg"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="har-predict",
        description="Classify images with a har-flax model (the built-in ImageNet classifier "
        "when no --model is given).",
        epilog="Examples: har-predict photo.jpg;  "
        "har-predict --model runs/best f1.jpg f2.jpg f3.jpg  (one 3-frame sequence);  "
        "har-predict --each --top-k 1 *.jpg",
    )
    parser.add_argument(
        "images",
        nargs="*",
        type=Path,
        metavar="IMAGE",
        help="JPEG/PNG/WebP/GIF/BMP files; several = the frames of one sequence (a one-frame "
        "model classifies each and averages) "
        f"(default: the bundled sample {SAMPLE_IMAGE.name})",
    )
    parser.add_argument(
        "--model", type=Path, help="model directory (default: the built-in ImageNet classifier)"
    )
    parser.add_argument(
        "--top-k", type=int, default=5, help="classes to print per answer, 0 = all (default: 5)"
    )
    parser.add_argument("--each", action="store_true", help="classify every image on its own")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 2 bad input or model)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error(f"--top-k must be 0 (all) or positive, got {args.top_k}")
    paths: list[Path] = args.images or [SAMPLE_IMAGE]
    if not args.images and not args.json:
        print(f"(no image given: classifying the bundled sample {SAMPLE_IMAGE})")
    blobs = []
    for path in paths:
        try:
            blobs.append(path.read_bytes())
        except OSError as e:
            print(f"har-predict: error: cannot read {path}: {e.strerror or e}", file=sys.stderr)
            return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Imported here so that --help and usage errors answer without loading JAX.
    from har_flax.checkpoint import CheckpointError
    from har_flax.images import ImageError
    from har_flax.predictor import Predictor

    groups = [[i] for i in range(len(paths))] if args.each else [list(range(len(paths)))]
    start = time.perf_counter()
    try:
        # One bucket, compiled on first use: a one-shot command should not warm up six.
        predictor = Predictor.load(args.model, batch_sizes=(1,), warmup=False)
    except CheckpointError as e:
        print(f"har-predict: error: {e}", file=sys.stderr)
        return 2
    samples = []
    for group in groups:
        try:
            samples.append(predictor.prepare([blobs[i] for i in group]))
        except ImageError as e:
            print(f"har-predict: error: {_where(e, [paths[i] for i in group])}: {e.reason}",
                  file=sys.stderr)  # fmt: skip
            return 2
    results = predictor.predict_samples(samples)
    elapsed = time.perf_counter() - start
    info = predictor.info
    k = args.top_k or info.num_classes

    if args.json:
        out = {
            "model": dataclasses.asdict(info),
            "predictions": [
                {
                    "images": [str(paths[i]) for i in group],
                    "action": ranked[0][0],
                    "confidence": ranked[0][1],
                    "all_predictions": [{"action": c, "confidence": p} for c, p in ranked[:k]],
                }
                for group, ranked in zip(groups, results, strict=True)
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"model {info.name} {info.version} ({info.kind}, {info.num_classes} classes, "
        f"{info.image_size}x{info.image_size}); {elapsed:.1f}s including compilation"
    )
    width = max(len(c) for c, _ in (r for ranked in results for r in ranked[:k]))
    for group, ranked in zip(groups, results, strict=True):
        names = ", ".join(str(paths[i]) for i in group)
        print(f"\n{names}:")
        for rank, (name, p) in enumerate(ranked[:k], 1):
            print(f"  {rank:>3}. {name:<{width}}  {p:.4f}")
    return 0


def _where(error, paths: list[Path]) -> str:
    """Names the file (and frame) an ImageError is about; its field is "images[i]" or "images"."""
    match = re.fullmatch(r"images\[(\d+)\]", error.field)
    where = str(paths[int(match.group(1))]) if match else ", ".join(map(str, paths))
    return where + (f" (frame {error.frame})" if error.frame is not None else "")


if __name__ == "__main__":
    sys.exit(main())
