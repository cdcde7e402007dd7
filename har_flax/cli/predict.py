"""``har-predict``: classify image files with a model directory or the built-in ImageNet model.

Several images are one frame sequence (one answer); ``--each`` classifies them one by one. With
no image it classifies the bundled sample photo, so a fresh clone has something to show.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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
        "har-predict --model runs/har/model f1.jpg f2.jpg f3.jpg  (one 3-frame sequence);  "
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
    parser.add_argument(
        "--each",
        action="store_true",
        help="classify every image on its own; a bad file is reported and the others answered",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # Local files are the user's own: limits higher than the server's (which guards against
    # strangers' decompression bombs), still below Pillow's own refusal at ~179 M pixels.
    from har_flax.images import LOCAL_LIMITS  # Pillow and NumPy only, no JAX

    own = LOCAL_LIMITS
    limits = parser.add_argument_group("limits (higher than the server's: these are your files)")
    limits.add_argument(
        "--max-image-mb", type=float, default=own.max_bytes / 2**20, metavar="MB",
        help=f"largest file, in MiB (default: {own.max_bytes / 2**20:g})",
    )  # fmt: skip
    limits.add_argument(
        "--max-pixels", type=int, default=own.max_pixels, metavar="N",
        help=f"largest frame, width x height (default: {own.max_pixels})",
    )  # fmt: skip
    limits.add_argument(
        "--max-frames", type=int, default=own.max_frames, metavar="N",
        help="most frames per answer, animated images counted per frame "
        f"(default: {own.max_frames})",
    )  # fmt: skip
    return parser


# The flag that raises each ImageLimits field an ImageTooLargeError names (Pillow's own
# refusal, limit None, is final).
_LIMIT_FLAGS = {
    "max_bytes": "--max-image-mb",
    "max_pixels": "--max-pixels",
    "max_frames": "--max-frames",
    "max_total_pixels": "--max-frames or --max-pixels",
}


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 2 bad input or model)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader left (`har-predict --json ... | head`): no traceback, and none at exit
        # either, when Python flushes the dead pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error(f"--top-k must be 0 (all) or positive, got {args.top_k}")
    for flag, value in (("--max-image-mb", args.max_image_mb), ("--max-pixels", args.max_pixels),
                        ("--max-frames", args.max_frames)):  # fmt: skip
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.model is not None and args.model.is_file():
        parser.error(f"--model {args.model} is a file; give the model directory (config.json, ...)")
    paths: list[Path] = args.images or [SAMPLE_IMAGE]
    if not args.images and not args.json:
        print(f"(no image given: classifying the bundled sample {SAMPLE_IMAGE})")
    max_bytes = int(args.max_image_mb * 2**20)
    groups = [[i] for i in range(len(paths))] if args.each else [list(range(len(paths)))]
    # A file that cannot be read fails its group (with --each, only itself): {index: message}.
    blobs, unreadable = _read_files(paths, max_bytes)
    if unreadable and not args.each:
        for i, message in unreadable.items():
            print(f"har-predict: error: {paths[i]}: {message}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Imported here so that --help and usage errors answer without loading JAX.
    from har_flax.checkpoint import CheckpointError
    from har_flax.images import ImageError, ImageLimits
    from har_flax.predictor import Predictor

    limits = ImageLimits(
        max_bytes=max_bytes,
        max_pixels=args.max_pixels,
        max_frames=args.max_frames,
        max_total_pixels=args.max_pixels * args.max_frames,
    )
    start = time.perf_counter()
    try:
        # One bucket, compiled on first use: a one-shot command should not warm up six.
        predictor = Predictor.load(args.model, batch_sizes=(1,), limits=limits, warmup=False)
    except CheckpointError as e:
        print(f"har-predict: error: {e}", file=sys.stderr)
        return 2
    samples, errors = {}, {}  # by group number
    for g, group in enumerate(groups):
        if bad := [i for i in group if i in unreadable]:
            errors[g] = f"{paths[bad[0]]}: {unreadable[bad[0]]}"
            continue
        try:
            samples[g] = predictor.prepare([blobs[i] for i in group])
        except ImageError as e:
            flag = _LIMIT_FLAGS.get(getattr(e, "limit", None))
            hint = f" (raise the limit with {flag})" if flag else ""
            errors[g] = f"{_where(e, [paths[i] for i in group])}: {e.reason}{hint}"
    answered = dict(zip(samples, predictor.predict_samples(list(samples.values())), strict=True))
    elapsed = time.perf_counter() - start
    info = predictor.info
    k = args.top_k or info.num_classes

    if args.json:
        for message in errors.values():
            print(f"har-predict: error: {message}", file=sys.stderr)
        predictions = []
        for g, group in enumerate(groups):
            entry: dict = {"images": [str(paths[i]) for i in group]}
            if g in errors:
                entry["error"] = errors[g]
            else:
                ranked = answered[g]
                entry["action"], entry["confidence"] = ranked[0]
                entry["all_predictions"] = [{"action": c, "confidence": p} for c, p in ranked[:k]]
            predictions.append(entry)
        print(json.dumps({"model": dataclasses.asdict(info), "predictions": predictions}, indent=2))
        return 2 if errors else 0
    if answered:
        print(
            f"model {info.name} {info.version} ({info.kind}, {info.num_classes} classes, "
            f"{info.image_size}x{info.image_size}); {elapsed:.1f}s including compilation"
        )
        width = max(len(c) for c, _ in (r for ranked in answered.values() for r in ranked[:k]))
    # In the order given; stdout is flushed before each line on stderr, so that the two read
    # in that order when they go to one pipe or file too.
    for g, group in enumerate(groups):
        if g in errors:
            sys.stdout.flush()
            print(f"har-predict: error: {errors[g]}", file=sys.stderr)
            continue
        names = ", ".join(str(paths[i]) for i in group)
        print(f"\n{names}:")
        for rank, (name, p) in enumerate(answered[g][:k], 1):
            print(f"  {rank:>3}. {name:<{width}}  {p:.4f}")
    if errors and args.each:
        sys.stdout.flush()
        print(f"har-predict: {len(errors)} of {len(groups)} images failed", file=sys.stderr)
    return 2 if errors else 0


def _read_files(paths: list[Path], max_bytes: int) -> tuple[dict[int, bytes], dict[int, str]]:
    """Reads each file, never more than ``max_bytes`` + 1 of it: (contents, problems) by index."""
    blobs, problems = {}, {}
    for i, path in enumerate(paths):
        try:
            if path.is_dir():
                problems[i] = "is a directory, not an image file"
                continue
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            problems[i] = f"cannot read it: {e.strerror or e}"
            continue
        if len(data) > max_bytes:
            problems[i] = (
                f"over the {max_bytes / 2**20:.4g} MiB limit per image "
                "(raise the limit with --max-image-mb)"
            )
            continue
        blobs[i] = data
    return blobs, problems


def _where(error, paths: list[Path]) -> str:
    """Names the file (and frame) an ImageError is about; its field is "images[i]" or "images"."""
    match = re.fullmatch(r"images\[(\d+)\]", error.field)
    where = str(paths[int(match.group(1))]) if match else ", ".join(map(str, paths))
    return where + (f" (frame {error.frame})" if error.frame is not None else "")


if __name__ == "__main__":
    sys.exit(main())
