"""Training throughput: train-step images/s and the wall time of one epoch, once compiled.

    python scripts/bench_train.py --config tiny --batch-size 16 --epoch-images 480    # CPU
    python scripts/bench_train.py --batch-size 256 --set model.dtype=bfloat16         # GPU/TPU

The step benchmark feeds one batch already on the devices (the model's own speed); the epoch
benchmark runs the training loop's real input path (host gather, copy to the devices,
prefetch) over ``--epoch-images`` images held in memory, or over the training split of
``--data-dir`` (its memory-mapped prepared arrays). ``input_images_per_sec`` is that input
path alone, without steps: the most it can feed (``--input-only`` measures just that, e.g.
to see whether a host can keep an accelerator busy).
Prints one JSON object; every number in it was measured by this run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default", help="preset name (default, tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size")
    parser.add_argument("--steps", type=int, default=50, help="timed train steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="the median repeat is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--epoch-images", type=int, default=12600, help="images in one epoch")
    parser.add_argument("--data-dir", type=Path, default=None, help="use this data's train split")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/har-bench"), help="for --data-dir"
    )
    parser.add_argument("--frozen", action="store_true", help="time the head-only stage's step")
    parser.add_argument(
        "--input-only", action="store_true", help="time only the input path (no model)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the timings, trace --profile-steps steps into DIR (jax.profiler) and print "
        "where the step's time goes, per part and per XLA op, to stderr",
    )
    parser.add_argument("--profile-steps", type=int, default=5, help="steps traced (>= 1)")
    return parser


class _Memory:
    """An in-memory training split with random pixels (the speed does not depend on them)."""

    def __init__(self, n: int, size: int, classes: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, classes, n).astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, idx):
        return self.images[idx], self.labels[idx]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile_steps < 1:
        parser.error(f"--profile-steps must be at least 1, got {args.profile_steps}")
    import jax
    import numpy as np

    from har_flax import sharding, train
    from har_flax.cli.train import parse_overrides
    from har_flax.config import get_config, override

    config = override(get_config(args.config), parse_overrides(args.overrides))
    if args.batch_size:
        config = override(config, {"train.batch_size": args.batch_size})
    bs, size = config.train.batch_size, config.model.image_size
    if config.model.pretrained != "none":
        # The weights' values do not change the speed (so none are loaded), but the BatchNorm
        # mode does: keep the one this config trains with (frozen for a pretrained backbone).
        config = override(
            config,
            {
                "model.pretrained": "none",
                "model.freeze_backbone_batchnorm": config.model.backbone_batchnorm_frozen,
            },
        )
    mesh = sharding.make_mesh()
    sharding.check_batch_size(bs, mesh)

    if args.data_dir is not None:
        from har_flax.data import load_splits

        splits = load_splits(args.data_dir, args.workdir, image_size=size, data_config=config.data)
        source = splits.train
        config = override(config, {"model.num_classes": len(splits.classes)})
    else:
        source = _Memory(args.epoch_images, size, config.model.num_classes)
    spe = train.steps_per_epoch(len(source), bs)
    env = {
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "config": config.name,
        "image_size": size,
        "batch_size": bs,
        "source": "memory" if args.data_dir is None else "prepared arrays",
        "epoch_images": spe * bs,
    }
    if os.environ.get("XLA_FLAGS"):  # they change the program (bench_gpu.sh's profile sets one)
        env["xla_flags"] = os.environ["XLA_FLAGS"]

    # The input path alone (gather, copy to the devices, prefetch): the rate it can feed.
    input_times = []
    for r in range(args.repeats):
        order = train.epoch_permutation(len(source), 0, r)
        t0 = time.perf_counter()
        batches = train._prefetch(train._train_batches(source, order, bs, 0, spe, config, mesh))
        jax.block_until_ready(collections.deque(batches, maxlen=1)[0])  # consume; wait for the last
        input_times.append(time.perf_counter() - t0)
        batches.close()
    input_s = statistics.median(input_times)
    env["input_images_per_sec_each_repeat"] = [round(spe * bs / t, 1) for t in input_times]
    env["input_images_per_sec"] = round(spe * bs / input_s, 1)
    if args.input_only:
        print(json.dumps(env, indent=2))
        return 0

    state = sharding.replicate(train.create_train_state(config, spe), mesh)
    step = train.make_train_step(config, spe, freeze_backbone=args.frozen)
    key = jax.random.key(0)
    batch = next(train._train_batches(source, np.arange(len(source)), bs, 0, 1, config, mesh))

    skipped = []  # per step: was the loss or gradient non-finite (so the update was skipped)?
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = step(state, batch, key)
        skipped.append(metrics["skipped"])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0

    step_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch, key)
            skipped.append(metrics["skipped"])
        jax.block_until_ready(metrics)
        step_times.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(step_times)

    # One epoch through the real input path: gather, copy to the devices, prefetch, step.
    order = train.epoch_permutation(len(source), 0, args.repeats)
    t0 = time.perf_counter()
    batches = train._prefetch(train._train_batches(source, order, bs, 0, spe, config, mesh))
    for device_batch in batches:
        state, metrics = step(state, device_batch, key)
        skipped.append(metrics["skipped"])
    jax.block_until_ready(metrics)
    epoch_s = time.perf_counter() - t0
    batches.close()

    result = {
        **env,
        "dtype": config.model.dtype,
        "depthwise_impl": config.model.depthwise_impl,
        "backbone_batchnorm_frozen": config.model.backbone_batchnorm_frozen,
        "augment": config.train.augment,
        "frozen_backbone": args.frozen,
        "warmup_seconds": round(compile_s, 2),
        "step_ms_each_repeat": [round(t * 1e3, 3) for t in step_times],
        "step_ms": round(step_s * 1e3, 3),
        "train_step_images_per_sec": round(bs / step_s, 1),
        "epoch_seconds": round(epoch_s, 3),
        "epoch_images_per_sec": round(spe * bs / epoch_s, 1),
        "final_loss": float(metrics["loss"]),
        "final_grad_norm": float(metrics["grad_norm"]),
        # Non-zero means the numbers are not a valid training run (see docs/BENCHMARKS.md).
        "nonfinite_steps": int(np.sum(jax.device_get(skipped))),
    }
    # The timings first: a profile that crashes or runs out of time cannot lose them.
    print(json.dumps(result, indent=2), flush=True)
    if args.profile:
        try:
            parts = _profile(args, step, state, batch, key)
        except Exception as e:  # The timings above stand without it.
            print(f"profile failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print("profile_ms_per_step " + json.dumps(parts), file=sys.stderr)
    return 0


def _profile(args, step, state, batch, key) -> dict[str, float]:
    """Traces a few steps, prints the per-part and per-op table, returns ms per step by part."""
    import jax

    from har_flax import profiling

    # Traced: the very program whose HLO names each op's source (compiled ahead of time, from
    # the compilation cache when there is one).
    compiled = step.lower(state, batch, key).compile()
    hlo = compiled.as_text()
    module = hlo.split(None, 2)[1].rstrip(",")  # "HloModule jit__train_step, ..."
    with jax.profiler.trace(str(args.profile)):
        for _ in range(args.profile_steps):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
    prof = profiling.summarize(args.profile, hlo, module, args.profile_steps)
    print(prof.table(), file=sys.stderr)
    return {part: round(ms, 3) for part, ms in prof.parts.items()}


if __name__ == "__main__":
    sys.exit(main())
