"""Reference point for bench_train.py: torchvision's MobileNetV2 train step on the same GPU.

    python scripts/bench_torch_mobilenet.py --batch-size 256             # eager
    python scripts/bench_torch_mobilenet.py --batch-size 256 --compile   # torch.compile

The comparison the training issue asks for: torchvision ``mobilenet_v2`` (15 classes, no
pretrained weights), bf16 autocast, channels_last, AdamW, cross-entropy, one batch of random
pixels already on the GPU. It times forward + backward + optimizer step, the same work as
``bench_train.py``'s "train_step_images_per_sec" minus our augmentation and LSTM head.
PyTorch and torchvision are not dependencies of har-flax; install them to run this.
Prints one JSON object; every number in it was measured by this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="the median repeat is reported")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats, args.warmup) < 1:
        parser.error("--batch-size, --steps, --repeats and --warmup must be positive")

    try:
        import torch
        import torchvision
    except ImportError as e:
        raise SystemExit(f"this benchmark needs PyTorch and torchvision ({e})") from e

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch; use --device cpu for a smoke test")
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=args.classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step_model = torch.compile(model) if args.compile else model

    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = (
        torch.rand(shape, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    )
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = loss_fn(step_model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - start

    step_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        step_times.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(step_times)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "model": "torchvision mobilenet_v2 (width 1.0)",
        "mode": "torch.compile" if args.compile else "eager",
        "autocast": "bfloat16",
        "memory_format": "channels_last",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "warmup_seconds": round(warmup_s, 2),
        "step_ms_each_repeat": [round(t * 1e3, 3) for t in step_times],
        "step_ms": round(step_s * 1e3, 3),
        "train_step_images_per_sec": round(args.batch_size / step_s, 1),
        "final_loss": float(loss.detach().float().cpu()),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
