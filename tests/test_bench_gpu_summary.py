"""scripts/bench_gpu.sh's closing summary reads every kind of log its sections write."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = (
    '{\n  "device": "NVIDIA H200",\n  "step_ms": 20.563,\n  "train_step_images_per_sec": 12449.3\n}'
)


def test_summary_lists_the_json_rows_and_skips_the_others(tmp_path):
    # What the sections of the lease of 2026-11-27 (evening) wrote, shortened: a JSON object
    # with a profile after it, the predict table (a line that starts with a number), the
    # gradient probe's plain lines. The summary crashed on the predict table.
    (tmp_path / "train_default.log").write_text(STEP + '\nprofile_ms_per_step {"other": 13.3}\n')
    (tmp_path / "predict.log").write_text(
        "2026-11-27 22:34 UTC; Intel(R) Xeon(R) Processor, 16 cores\n\n| runtime | top-1 |\n"
    )
    (tmp_path / "grad_probe.log").write_text("conv: non-finite 0/512, rel. error 1.65e-03\n")
    env = {**os.environ, "SECTIONS": "none", "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "scripts/bench_gpu.sh", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = run.stdout[run.stdout.index("== summary") :]
    assert "Traceback" not in summary, summary
    assert "train_default {'device': 'NVIDIA H200', 'step_ms': 20.563," in summary, summary
    assert 'train_default profile_ms_per_step {"other": 13.3}' in summary, summary
    assert "predict" not in summary and "grad_probe" not in summary, summary
