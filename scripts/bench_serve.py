"""Benchmarks the gRPC server against the raw Predictor, in one run on one machine.

    python scripts/bench_serve.py [--model DIR] [--duration 10] [--out docs/bench_serve.json]

1. Raw: the Predictor in this process, forward only and decode + forward, for one image and a
   batch of 32 (the floor any server adds to).
2. The server (`python -m grpc_server.main` subprocesses, batching on, then off): latency p50/p99
   and throughput with 1, 8 and 32 concurrent clients sending the same real JPEG photo.
Prints a Markdown table (and writes JSON with --out). Targets from the issue: single-request p50
at most 1.5x the raw single-image forward; at 32 clients, batching at least 2x the throughput of
the unbatched server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (\S+):(\d+)")


def photo_jpeg() -> bytes:
    """The bundled sample photo (a cat, 1 JPEG as a user would send it)."""
    return (REPO / "har_flax" / "assets" / "samples" / "cat.jpg").read_bytes()


def percentiles(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


class Raw:
    """The Predictor alone, in this process: the floor any server adds to."""

    def __init__(self, model: str | None, data: bytes):
        from har_flax.predictor import Predictor

        self.predictor = Predictor.load(model, batch_sizes=(1, 32))
        self.data = data
        self.sample = self.predictor.prepare([data])

    def measure(self, repeats: int) -> dict:
        """Forward for 1 and 32 prepared samples, and prepare + forward for 1."""
        p, sample = self.predictor, self.sample
        for _ in range(3):
            p.predict_samples([sample])
        forward, full = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            p.predict_samples([sample])
            forward.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            p.predict_samples([p.prepare([self.data])])
            full.append(time.perf_counter() - t0)
        batch = [sample] * 32
        p.predict_samples(batch)
        batched = []
        for _ in range(max(3, repeats // 8)):
            t0 = time.perf_counter()
            p.predict_samples(batch)
            batched.append(time.perf_counter() - t0)
        return {
            "model": f"{p.info.name} {p.info.version}",
            "forward_1": percentiles(forward),
            "prepare_forward_1": percentiles(full),
            "forward_32_ms": float(np.median(batched) * 1e3),
            "forward_32_images_per_s": 32 / float(np.median(batched)),
        }


class Server:
    """A `python -m grpc_server.main` subprocess on a free port."""

    def __init__(self, args: list[str]):
        cmd = [sys.executable, "-m", "grpc_server.main", "--host", "127.0.0.1", "--port", "0"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [*cmd, "--drain", "0", *args],
            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.port = None
        # The access log stays on (production cost); stderr is drained so it never blocks.
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    def wait_serving(self, timeout: float) -> str:
        import grpc

        from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self._stderr[-30:]))
            if self.port is None:
                for line in self._stderr:
                    if m := LISTENING.search(line):
                        self.port = int(m.group(2))
            if self.port is not None:
                target = f"127.0.0.1:{self.port}"
                stub = har_pb2_grpc.ActionRecognitionStub(grpc.insecure_channel(target))
                try:
                    reply = stub.Health(har_pb2.HealthRequest(), timeout=2)
                    if reply.status == har_pb2.HealthResponse.SERVING:
                        return target
                except grpc.RpcError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"not SERVING after {timeout} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load(target: str, data: bytes, clients: int, duration: float, warmup: float) -> dict:
    """`clients` threads, each with its own channel, calling Predict back to back."""
    import grpc

    from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

    request = har_pb2.PredictRequest(images=[data], top_k=5)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_at = time.monotonic() + 0.5
    measure_from, stop_at = start_at + warmup, start_at + warmup + duration

    def run():
        stub = har_pb2_grpc.ActionRecognitionStub(grpc.insecure_channel(target))
        mine = []
        time.sleep(max(0.0, start_at - time.monotonic()))
        while (now := time.monotonic()) < stop_at:
            try:
                stub.Predict(request, timeout=60)
            except grpc.RpcError as e:
                with lock:
                    errors.append(e.code().name)
                continue
            if now >= measure_from:
                mine.append(time.monotonic() - now)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not latencies:
        raise RuntimeError(f"no successful requests at concurrency {clients}: {errors[:5]}")
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "throughput_rps": len(latencies) / duration,
        **percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: built-in)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=40, help="raw forward repetitions")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-us", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    data = photo_jpeg()

    print("raw Predictor ...", file=sys.stderr)
    raw = Raw(args.model, data)
    raw_before = raw.measure(args.repeats)
    model_args = ["--model", args.model] if args.model else []
    on = [*model_args, "--batching", "on"]
    servers = {
        "batching": [*on, "--max-batch-size", str(args.max_batch_size)],
        "batching, max 4, 2 model threads": [*on, "--max-batch-size", "4", "--model-threads", "2"],
        "no batching": [*model_args, "--batching", "off"],
    }
    for server_args in servers.values():
        server_args += ["--max-wait-us", str(args.max_wait_us)]
    results = {}
    for name, server_args in servers.items():
        print(f"server ({name}) ...", file=sys.stderr)
        server = Server(server_args)
        try:
            target = server.wait_serving(timeout=900)
            results[name] = [load(target, data, c, args.duration, args.warmup) for c in levels]
        finally:
            server.stop()
    # Measured again at the end: on a shared machine the two show how much the load drifted.
    raw_after = raw.measure(args.repeats)

    import jax

    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"{jax.default_backend()}",
        "load_average": os.getloadavg(),
        "raw": raw_before,
        "raw_after": raw_after,
        "server": results,
        "settings": vars(args) | {"out": str(args.out)},
    }
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


def markdown(report: dict) -> str:
    raw, after = report["raw"], report["raw_after"]
    lines = [
        f"Machine: {report['machine']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in report['load_average'])}. Model: {raw['model']}.",
        "",
        "| what | clients | p50 ms | p99 ms | requests/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| raw forward, 1 image | 1 | {raw['forward_1']['p50_ms']:.1f} | "
        f"{raw['forward_1']['p99_ms']:.1f} | {1e3 / raw['forward_1']['p50_ms']:.1f} |",
        f"| raw decode + forward, 1 image | 1 | {raw['prepare_forward_1']['p50_ms']:.1f} | "
        f"{raw['prepare_forward_1']['p99_ms']:.1f} | "
        f"{1e3 / raw['prepare_forward_1']['p50_ms']:.1f} |",
        f"| raw forward, batch of 32 | - | {raw['forward_32_ms']:.1f} | - | "
        f"{raw['forward_32_images_per_s']:.1f} |",
        f"| raw forward, 1 image, after the servers | 1 | {after['forward_1']['p50_ms']:.1f} | "
        f"{after['forward_1']['p99_ms']:.1f} | {1e3 / after['forward_1']['p50_ms']:.1f} |",
        f"| raw forward, batch of 32, after | - | {after['forward_32_ms']:.1f} | - | "
        f"{after['forward_32_images_per_s']:.1f} |",
    ]
    for name, rows in report["server"].items():
        for r in rows:
            errors = f" ({r['errors']} errors)" if r["errors"] else ""
            lines.append(
                f"| server, {name} | {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['throughput_rps']:.1f}{errors} |"
            )
    single = report["server"]["batching"][0]
    ratio = single["p50_ms"] / raw["forward_1"]["p50_ms"]
    lines.append("")
    lines.append(f"Single request p50 / raw forward p50: {ratio:.2f} (target <= 1.5).")
    on, off = ({r["clients"]: r for r in report["server"][k]} for k in ("batching", "no batching"))
    top = max(on)
    if top in off:
        gain = on[top]["throughput_rps"] / off[top]["throughput_rps"]
        lines.append(f"Throughput at {top} clients, batching / no batching: {gain:.2f}x "
                     "(target >= 2).")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
