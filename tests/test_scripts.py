"""Every console script has its `python scripts/NAME.py` twin, as README.md promises."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# README: NAME is the command without "har-", "-" as "_"; two servers are named for what they do.
EXCEPTIONS = {"har-serve": "serve.py", "har-webui": "serve_webui.py"}


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_the_readme_lists_every_command():
    readme = (REPO / "README.md").read_text()
    for command in console_scripts():
        assert f"| `{command} " in readme, f"{command} is not in README.md's table"


@pytest.mark.parametrize("command", sorted(console_scripts()))
def test_each_command_is_also_a_script(command):
    script = EXCEPTIONS.get(command, command.removeprefix("har-").replace("-", "_") + ".py")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--help"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {command} "), proc.stdout[:200]
