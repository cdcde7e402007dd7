"""Benchmarks the Flax forward pass of the default model next to the int8 TFLite interpreter.

    python scripts/bench_predict.py [--impls auto,conv] [--repeats 5] [--json OUT]
    python scripts/bench_predict.py --variables arguments    # as before 2026-11-26 09:30 UTC

Measures, in one run on this machine: the single-image forward p50/p90 of the built-in
FrameClassifier (MobileNetV2 1.0/224 with the ImageNet weights ported from the bundled TFLite
file, jitted, float32; the variables compiled in or passed per call as the Predictor does on
this backend) and its batched throughput (batch 1, 8, 32); then the same for the
bundled int8 file in the ai-edge-litert interpreter (XNNPACK, 2 threads, batch 1 invocations).
Repeats each measurement and reports the repeat with the lowest p50, with every repeat's p50
and the load average, because other processes may share the CPU. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SIZE = 224


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cat_image() -> np.ndarray:
    """The bundled cat photo, resized to uint8 (224, 224, 3)."""
    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "har_flax" / "assets" / "samples" / "cat.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))


def latency(fn, iters: int, repeats: int) -> dict:
    """p50/p90 in ms of ``fn()`` over ``iters`` calls, for the repeat with the lowest p50.

    Args:
      fn: a zero-argument callable that blocks until its result is ready.
      iters: calls per repeat.
      repeats: independent repeats (the least disturbed one is reported).

    Returns:
      {"p50_ms", "p90_ms", "p50s_ms": every repeat's p50}.
    """
    runs = []
    for _ in range(repeats):
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        runs.append(np.asarray(times) * 1e3)
    best = min(runs, key=np.median)
    return {
        "p50_ms": float(np.median(best)),
        "p90_ms": float(np.percentile(best, 90)),
        "p50s_ms": [round(float(np.median(r)), 3) for r in runs],
    }


def throughput(fn, batch: int, seconds: float, repeats: int) -> float:
    """Images per second of ``fn()`` (one batch of ``batch`` per call), best of ``repeats``."""
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
            fn()
            calls += 1
        best = max(best, calls * batch / elapsed)
    return best


def bench_flax(impl: str, batches: list[int], args, image: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    from har_flax.models import FrameClassifier
    from har_flax.models.mobilenet_v2 import resolve_depthwise_impl
    from har_flax.predictor import compile_forward
    from har_flax.weights import imagenet_labels
    from har_flax.weights.tflite import port_tflite

    ported = port_tflite()  # MobileNetV2(include_top, 1001) with the ImageNet weights
    variables = jax.device_put({k: {"backbone": v} for k, v in ported.items()})
    model = FrameClassifier(num_classes=1001, depthwise_impl=impl)
    labels = imagenet_labels()

    def compiled(x):  # what the Predictor compiles for one bucket
        return compile_forward(model, variables, x, embed=args.embed)

    single = jnp.asarray(image[None, None])  # (1, 1, H, W, 3) uint8
    start = time.perf_counter()
    forward = compiled(single)
    logits = forward(single).block_until_ready()
    compile_s = time.perf_counter() - start
    result = {
        "impl": f"{impl} -> {resolve_depthwise_impl(impl)}, variables "
        + ("embedded" if args.embed else "as arguments"),
        "compile_s": round(compile_s, 2),
        "top1": labels[int(np.argmax(logits[0]))],
        "single": latency(lambda: forward(single).block_until_ready(), args.iters, args.repeats),
        "throughput": {},
    }
    rng = np.random.default_rng(0)
    for b in batches:
        x = jnp.asarray(rng.integers(0, 256, (b, 1, SIZE, SIZE, 3), dtype=np.uint8))
        run = compiled(x)
        run(x).block_until_ready()
        result["throughput"][b] = throughput(
            lambda x=x, run=run: run(x).block_until_ready(), b, args.seconds, args.repeats
        )
    return result


def bench_tflite(args, image: np.ndarray) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from har_flax.weights import BUNDLED_TFLITE, imagenet_labels

    interpreter = Interpreter(model_path=str(BUNDLED_TFLITE), num_threads=args.tflite_threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    if tuple(inp["shape"]) != (1, SIZE, SIZE, 3) or inp["dtype"] != np.uint8:
        raise SystemExit(f"unexpected TFLite input {inp['shape']} {inp['dtype']}")
    # Input scale 1/127.5, zero point 127 (SOURCE.md): raw RGB bytes are the quantized input.
    interpreter.set_tensor(inp["index"], image[None])

    def run():
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    top1 = imagenet_labels()[int(np.argmax(run()[0]))]
    single = latency(run, args.iters, args.repeats)
    rate = throughput(run, 1, args.seconds, args.repeats)
    return {
        "impl": f"int8, XNNPACK, {args.tflite_threads} threads",
        "top1": top1,
        "single": single,
        "throughput": {1: rate},
    }


def markdown(results: dict, batches: list[int]) -> str:
    head = ["runtime", "top-1 (cat.jpg)", "1 image p50 ms", "p90 ms", "p50 of each repeat"]
    head += [f"batch {b} img/s" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        s = r["single"]
        rates = [f"{r['throughput'][b]:.0f}" if b in r["throughput"] else "—" for b in batches]
        row = [
            f"{name} ({r['impl']})",
            r["top1"],
            f"{s['p50_ms']:.2f}",
            f"{s['p90_ms']:.2f}",
            ", ".join(f"{p:.2f}" for p in s["p50s_ms"]),
            *rates,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from har_flax.config import DEPTHWISE_IMPLS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--impls", default="auto", help="Flax conv implementations: auto,conv,gemm,shift"
    )
    parser.add_argument("--batches", default="1,8,32", help="batch sizes for throughput")
    parser.add_argument("--iters", type=int, default=100, help="single-image calls per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the best p50 is shown")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput repeat")
    parser.add_argument("--tflite-threads", type=int, default=2)
    parser.add_argument("--no-tflite", action="store_true", help="skip the TFLite interpreter")
    parser.add_argument(
        "--variables",
        choices=("auto", "embedded", "arguments"),
        default="auto",
        help="compile the variables in as constants, or pass them per call; auto = what the "
        "Predictor does on this backend (embedded on a CPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    impls = [i for i in args.impls.split(",") if i]
    for impl in impls:
        if impl not in DEPTHWISE_IMPLS:
            parser.error(f"--impls: unknown implementation {impl!r}; use one of {DEPTHWISE_IMPLS}")
    if any(b < 1 for b in batches) or args.iters < 1 or args.repeats < 1:
        parser.error("--batches, --iters and --repeats must be positive")

    import jax

    from har_flax.predictor import embeds_variables

    args.embed = embeds_variables() if args.variables == "auto" else args.variables == "embedded"
    image = cat_image()
    load_before = os.getloadavg()
    results = {f"flax {impl}": bench_flax(impl, batches, args, image) for impl in impls}
    if not args.no_tflite:
        results["tflite"] = bench_tflite(args, image)
    load_after = os.getloadavg()

    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "command": "python scripts/bench_predict.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores; jax {meta['jax']} "
        f"({meta['backend']}); 1-min load average {meta['loadavg_1m_before_after'][0]} before, "
        f"{meta['loadavg_1m_before_after'][1]} after\n"
    )
    print(markdown(results, batches))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
