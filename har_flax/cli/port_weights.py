"""``har-port-weights``: ImageNet MobileNetV2 weights (TFLite or Keras .h5) -> a model directory.

The directory is served by ``har-serve --model DIR`` as the ImageNet object classifier, and is a
``model.pretrained`` source for training (``har_flax.weights.load_pretrained_backbone``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from har_flax.cli import out_dir_problem

FORMATS = ("tflite", "keras-h5")
KERAS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="har-port-weights",
        description="Port ImageNet MobileNetV2 (width 1.0) weights to a har-flax model directory.",
        epilog=(
            "Examples: har-port-weights --out models/imagenet  (the bundled int8 TFLite file); "
            "har-port-weights --from keras-h5 mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
            f"1.0_224.h5 --out models/imagenet-float  (download: {KERAS_URL})"
        ),
    )
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=FORMATS,
        default="tflite",
        help="source format (default: tflite)",
    )
    parser.add_argument(
        "src",
        nargs="?",
        type=Path,
        help="weights file; default for tflite: the bundled tf2_mobilenet_v2_1.0_224_ptq.tflite; "
        "required for keras-h5",
    )
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    return parser


def _format_hint(path: Path, chosen: str) -> str:
    """Suggests the other --from when the file's magic bytes say it is that format."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    actual = (
        "tflite" if head[4:8] == b"TFL3" else "keras-h5" if head == b"\x89HDF\r\n\x1a\n" else None
    )
    return (
        f" (the file looks like {actual}: try --from {actual})"
        if actual and actual != chosen
        else ""
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 1 port failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source_format == "keras-h5" and args.src is None:
        parser.error(f"--from keras-h5 needs the .h5 file (download it from {KERAS_URL})")
    if args.src is not None and not args.src.is_file():
        what = "is a directory" if args.src.is_dir() else "does not exist"
        suffix = {"tflite": ".tflite", "keras-h5": ".h5"}[args.source_format]
        parser.error(f"weights file {args.src} {what}; give the {suffix} file")
    if problem := out_dir_problem("--out", args.out):
        parser.error(problem)

    # Imported here so that --help and usage errors answer without loading JAX.
    from har_flax import weights
    from har_flax.checkpoint import CheckpointError, check_model_destination

    try:
        # Before the port: the model replaces --out as a whole, so it must hold no other files.
        check_model_destination(args.out)
    except CheckpointError as e:
        parser.error(f"--out {e}")

    src = args.src or weights.BUNDLED_TFLITE  # keras-h5 without a file was refused above
    start = time.perf_counter()
    try:
        if args.source_format == "tflite":
            from har_flax.weights.tflite import NUM_CLASSES, port_tflite

            variables, num_classes = port_tflite(src), NUM_CLASSES
        else:
            from har_flax.weights.keras_h5 import port_keras_h5

            variables = port_keras_h5(src)
            if "predictions" not in variables["params"]:
                print(
                    f"har-port-weights: error: {src} has no classifier ('predictions' layer; a "
                    "_no_top file?). An ImageNet model directory needs the file with the top "
                    f"({KERAS_URL}); to train from a _no_top file, give its path as the "
                    "backbone source instead (model.pretrained=FILE.h5).",
                    file=sys.stderr,
                )
                return 1
            num_classes = variables["params"]["predictions"]["kernel"].shape[1]
        out = weights.write_imagenet_model(
            args.out, variables, num_classes, source=f"{args.source_format}:{Path(src).name}"
        )
    except weights.WeightPortError as e:
        print(
            f"har-port-weights: error: {e}{_format_hint(src, args.source_format)}", file=sys.stderr
        )
        return 1
    except (OSError, CheckpointError) as e:  # Unwritable --out, disk full, unreadable source.
        print(f"har-port-weights: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {out} ({num_classes} ImageNet classes, from {args.source_format} {src}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
