#!/usr/bin/env bash
# Every GPU benchmark of docs/BENCHMARKS.md in one run, for a short lease on a lent GPU.
#
#   scripts/bench_gpu.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./bench-gpu-out)
#   SECTIONS="grad_probe train_default" scripts/bench_gpu.sh    (only these sections)
#
# Runs from the repository root with the machine's own JAX/Flax/optax/orbax and PyTorch
# (har_flax is used from the source tree; nothing is installed). Each benchmark is a separate
# process with its own time limit, so one failure or timeout does not lose the others; each
# writes its JSON/log to OUT_DIR and to standard output (a device call brings back only 8
# files: `... | tee "$OUT/run.log"` keeps everything in one), and a summary table is printed
# last.
#
# Sections run in order of importance: the issue's figures first. BUDGET_S (default 540)
# caps the whole run, so that it fits one 10-minute device call: a section starts only while
# at least two thirds of its limit are left, and never runs past the budget. A lease (15
# minutes, the machine's start included) fits one full call, then a short one on the
# still-warm machine for the sections the budget skipped (2026-11-27: 474 s, 116 s and 62 s,
# of 900):
#   BUDGET_S=530 bash scripts/bench_gpu.sh /tmp/bench 2>&1 | tee "$OUT/run.log"
#   SECTIONS="<the skipped ones>" BUDGET_S=270 bash scripts/bench_gpu.sh /tmp/bench2 \
#     2>&1 | tee "$OUT/run2.log"
# Compiled programs are cached in /tmp/har-jax-cache, so a rerun on a warm machine skips them.
#
# The inference benchmark ports the bundled TFLite weights, which needs the pure-Python `tflite`
# package. If the machine lacks it, put its wheel in .whl/ first (ignored by git), here:
#   pip download --no-deps --only-binary=:all: -d .whl tflite==2.18.0
# carry .whl, and the script installs it from there.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench-gpu-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/har-jax-cache}"
py="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --upgrade --target /tmp/har-site .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/har-site"
fi
t_start=$(date +%s)
budget=${BUDGET_S:-540}

section() {  # section NAME LIMIT_S COMMAND...: runs COMMAND, its output to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  case " ${SECTIONS:-$name} " in *" $name "*) ;; *) return ;; esac
  local left=$((budget - ($(date +%s) - t_start)))
  if [ "$left" -lt $((limit * 2 / 3)) ]; then
    echo "== $name: skipped, ${left} s of the ${budget} s budget left (limit ${limit} s)"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v "Delay kernel timed out" >"$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(($(date +%s) - t0)) s (total $(($(date +%s) - t_start)) s)"
  tail -n 90 "$out/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c 'import jax, flax, optax, orbax.checkpoint as o, numpy; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)'
  "$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
  nproc
} >"$out/env.log" 2>&1
cat "$out/env.log"

bt="scripts/bench_train.py --config default --batch-size 256 --set model.dtype=bfloat16"
fixed="--epoch-images 2560 --steps 30 --repeats 2"  # the variants: shorter, same batch
# 1. The issue's figure: the full CNN-LSTM train step of the default config (fine-tuning the
#    bundled ImageNet backbone: every weight trains, its BatchNorm statistics stay frozen;
#    on-device augmentation; depthwise_impl auto = "gemm" on a GPU), one epoch of 12,600
#    images through the input path, and that input path alone (input_images_per_sec: what
#    this host can feed). "nonfinite_steps" must be 0.
section train_default 200 "$py" $bt
# 2. Where that step's time goes: a jax.profiler trace of 5 steps, per part (augmentation,
#    backbone forward/backward, LSTM, head, optimiser) and per XLA op, after the step's
#    timings (printed first). Another epoch length is another program: it compiles again.
#    Without CUDA graphs ("command buffers"): the trace shows each graph as one op with no
#    source (2026-11-27: 13 of the step's 20 ms), so this run launches every kernel on its
#    own. Its step time is the step's without CUDA graphs, not the headline figure.
section train_profile 120 env XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}" \
  "$py" $bt --epoch-images 2560 --steps 10 --repeats 1 --profile /tmp/har-profile --profile-steps 5
# 3. Training from scratch (model.pretrained=none): BatchNorm in training mode, on the
#    batch's statistics (the headline row of the leases of 2026-11-26 and 2026-11-27).
section train_bn_training 150 "$py" $bt $fixed --set model.freeze_backbone_batchnorm=false
# 4. What the on-device augmentation costs (2.0 ms per step on 2026-11-27, in float32).
section train_no_augment 150 "$py" $bt $fixed --set train.augment=false
# 5. The PyTorch reference in the same lease.
section torch_eager 80 "$py" scripts/bench_torch_mobilenet.py --batch-size 256
# 6. The 3x3 depthwise layers as nine shifted multiply-adds fused with BatchNorm and ReLU6
#    (the CPU's form), never measured on a GPU.
section train_shift 150 "$py" $bt $fixed --set model.depthwise_impl=shift
# 7. Inference: single-image latency and batched throughput of the built-in model.
section predict 120 "$py" scripts/bench_predict.py --impls auto --batches 1,32,256 \
  --iters 50 --repeats 3 --seconds 1 --no-tflite
# 8. The gradient that came out non-finite on an H200 on 2026-11-26 (docs/BENCHMARKS.md): block
#    0's 1x1 projection, bf16, batch 256, as a cuDNN convolution ("conv") and as a GEMM ("gemm").
section grad_probe 150 "$py" - <<'EOF'
import jax, jax.numpy as jnp
from har_flax.models.mobilenet_v2 import conv2d
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
x = jax.random.uniform(k1, (256, 112, 112, 32), minval=0, maxval=6).astype(jnp.bfloat16)
dy = (jax.random.normal(k2, (256, 112, 112, 16)) * 1e-3).astype(jnp.bfloat16)
w = (jax.random.normal(k3, (1, 1, 32, 16)) * 0.2).astype(jnp.bfloat16)
ref = jnp.einsum("bhwc,bhwo->co", x.astype(jnp.float32), dy.astype(jnp.float32),
                 precision="highest")
for impl in ("conv", "gemm"):
    f = jax.jit(lambda w, impl=impl: jax.vjp(
        lambda w: conv2d(x, w, 1, ((0, 0), (0, 0)), impl), w)[1](dy)[0])
    dw = f(w)[0, 0].astype(jnp.float32)
    err = float(jnp.linalg.norm(dw - ref) / jnp.linalg.norm(ref))
    print(f"{impl}: non-finite {int(jnp.sum(~jnp.isfinite(dw)))}/{dw.size}, rel. error {err:.2e}")
EOF
section torch_compile 140 "$py" scripts/bench_torch_mobilenet.py --batch-size 256 --compile
# 9. All 1x1 layers as cuDNN convolutions (the GPU default before 2026-11-26).
section train_conv 150 "$py" $bt $fixed --set model.depthwise_impl=conv

echo "== summary"
"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for log in sorted(out.glob("*.log")):
    text = log.read_text()
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if start == 0 and not text.startswith("{"):
        continue  # no JSON object (the predict table, the probe's lines)
    try:  # the first JSON object at a line's start; lines after it (a profile) are ignored
        r, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        continue
    keys = ["device", "depthwise_impl", "backbone_batchnorm_frozen", "augment", "step_ms",
            "step_ms_each_repeat", "train_step_images_per_sec", "epoch_seconds", "epoch_images_per_sec",
            "input_images_per_sec", "warmup_seconds", "final_loss", "nonfinite_steps", "xla_flags"]
    print(log.stem, {k: r[k] for k in keys if k in r})
    for line in text.splitlines():
        if line.startswith(("profile_ms_per_step ", "profile failed")):
            print(log.stem, line)
EOF
echo "== total $(($(date +%s) - t_start)) s"
