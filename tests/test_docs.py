"""The Python examples in docs/PYTHON.md run, in order, as one script, and do what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "PYTHON.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.M | re.S)


@pytest.mark.slow
def test_the_python_guide_runs_as_written(tmp_path):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6, "docs/PYTHON.md lost its examples"
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    # A fresh interpreter in an empty folder, as a notebook user starts: the relative paths of
    # the guide (data/, runs/, reports/) land there.
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "('calling', 'clapping', 'cycling')" in done.stdout.splitlines(), done.stdout
    assert (tmp_path / "runs" / "notebook" / "model" / "labels.json").exists()
    assert (tmp_path / "reports" / "notebook" / "report.json").exists()
    # Training and evaluation shared one prepared copy, in download_dir, not in W/tfds.
    assert len(list((tmp_path / "data" / "prepared" / "har_kaggle").glob("*px-*"))) == 1
    assert not (tmp_path / "runs" / "notebook" / "tfds").exists()
    # progress_bar=False and progress=False: no tqdm bar on stderr.
    assert "%|" not in done.stderr, done.stderr[-4000:]
