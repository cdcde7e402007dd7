"""scripts/bench_train.py runs on the CPU and reports what it measured (not how fast)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from har_flax.data.synthetic import write_synthetic_kaggle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "scripts/bench_train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{") :])


def test_step_epoch_and_input_path_on_memory():
    r = _run("--config", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
             "--repeats", "1", "--epoch-images", "24")  # fmt: skip
    assert r["device"] and r["source"] == "memory" and r["epoch_images"] == 24
    assert r["batch_size"] == 8 and len(r["step_ms_each_repeat"]) == 1
    assert r["train_step_images_per_sec"] > 0 and r["epoch_seconds"] > 0
    assert r["input_images_per_sec"] > 0
    # 1 warm-up, 2 timed and 3 epoch steps, none skipped.
    assert r["nonfinite_steps"] == 0 and math.isfinite(r["final_loss"])


def test_input_only_on_prepared_data(tmp_path):
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=8, test_count=2, seed=1)
    r = _run("--config", "tiny", "--batch-size", "4", "--repeats", "2", "--input-only",
             "--data-dir", str(data), "--workdir", str(tmp_path / "work"))  # fmt: skip
    assert r["source"] == "prepared arrays"
    assert len(r["input_images_per_sec_each_repeat"]) == 2 and r["input_images_per_sec"] > 0
    assert "train_step_images_per_sec" not in r  # no model was built
    # The split it read is the run's stratified training split: 3 classes x 8, 20% held out.
    assert r["epoch_images"] == 16
