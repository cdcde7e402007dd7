"""The wheel a deployment installs (`pip install .`, not the editable install the tests use)
holds every module and data file, and its built-in model works from it, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("har_flax", "grpc_server", "webui")
# Not part of a source tree a wheel is built from: at any depth, and at the top (where the
# README's commands put data, runs and reports; har_flax/data is code).
_ANYWHERE = shutil.ignore_patterns("node_modules", "__pycache__", "*.pyc", "*.egg-info")
_TOP = {".git", ".venv", "build", "dist", ".pytest_cache", ".ruff_cache", "runs", "data",
        "reports", "models", "out", ".whl", "bench-gpu-out", "test-output"}  # fmt: skip


def _not_source(folder: str, names: list[str]) -> set[str]:
    return _ANYWHERE(folder, names) | (_TOP & set(names) if Path(folder) == REPO else set())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the working tree, and the build's output."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=_not_source)
    # The venv's setuptools builds it (no index needed); the output keeps setuptools' warnings.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("har_flax-*.whl")
    return built, proc.stdout + proc.stderr


def _expected_files() -> set[str]:
    """Every file of the three packages in the source tree: modules and data alike."""
    files = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(REPO).as_posix())
    return files


def test_the_wheel_holds_every_module_and_data_file(wheel):
    built, output = wheel
    with zipfile.ZipFile(built) as z:
        names = {n for n in z.namelist() if not n.startswith("har_flax-")}  # not .dist-info
    missing = _expected_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    extra = {n for n in names if "__pycache__" in n or n.split("/")[0] not in PACKAGES}
    assert not extra, f"in the wheel but not the packages' files: {sorted(extra)}"
    # setuptools installs data folders that are not packages with this warning, and has said it
    # will stop installing them.
    assert "BuildBackendWarning" not in output, output


def test_the_installed_wheel_predicts_with_its_bundled_weights(wheel, tmp_path):
    """Installed away from the checkout: the ImageNet weights and the sample photo come from the
    wheel (the dependencies from this environment)."""
    built, _ = wheel
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(site), str(built)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    # -S: no .pth files, so not the editable install's finder, which would serve any module the
    # wheel lacks from the checkout; the dependencies come from this environment's folders.
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *dependencies])}
    script = tmp_path / "predict.py"
    script.write_text(
        "import sys\n"
        "from har_flax.cli import predict\n"
        "try:\n"
        "    status = predict.main(sys.argv[1:])\n"
        "finally:\n"
        "    for m in list(sys.modules.values()):\n"
        f"        if m.__name__.split('.')[0] in {PACKAGES!r} and getattr(m, '__file__', None):\n"
        "            print(m.__file__, file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run([sys.executable, "-S", str(script), "--json", "--top-k", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    modules = [line for line in proc.stderr.splitlines() if line.endswith(".py")]
    assert len(modules) > 10 and all(m.startswith(str(site)) for m in modules), proc.stderr
    (answer,) = json.loads(proc.stdout)["predictions"]
    (photo,) = answer["images"]
    assert photo.startswith(str(site)), photo  # the wheel's sample photo, not the checkout's
    assert answer["action"] in {"Egyptian cat", "tabby, tabby cat", "tiger cat"}, answer
