"""Console-script entry points (``har-*``): parse arguments, call the library, report errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path


def out_dir_problem(flag: str, path: Path) -> str | None:
    """Why ``path`` cannot be used (or made) as an output directory, for a usage error; else None.

    Checked before any work, so that a long run does not end on ``File exists``.
    """
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if existing.is_dir():
        if os.access(existing, os.W_OK | os.X_OK):
            return None
        return f"{flag} {path}: cannot write in {existing}; name a directory you can write to"
    if existing == path:
        return (
            f"{flag} {path} exists and is not a directory: name a directory (it is made if "
            "missing), or move that file away"
        )
    return (
        f"{flag} {path}: {existing} exists and is not a directory, so {path} cannot be made; "
        "name another directory"
    )


def print_skipped(prog: str, skipped: Sequence[tuple[str, str]], why: str, note: str = "") -> None:
    """Lists on stderr the rows and images a command left out (``(file, reason)`` pairs)."""
    if not skipped:
        return
    print(f"{prog}: skipped {len(skipped)} bad rows or images ({why}){note}:", file=sys.stderr)
    for _, reason in skipped:  # a sentence that names the CSV line and the image
        print(f"  {reason}", file=sys.stderr)
