"""Checkpoints on disk, the only module that imports orbax.

A *model directory* is what the server loads and what ``har-port-weights`` writes::

    DIR/config.json    the resolved Config (JSON)
    DIR/labels.json    {"classes": [...], "kind": "action" | "imagenet", ...metadata}
    DIR/variables/     orbax StandardCheckpointer tree {"params", "batch_stats"}

It is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written model directory where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from har_flax.config import Config

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
VARIABLES_DIR = "variables"


class CheckpointError(RuntimeError):
    """A model directory is missing, incomplete or inconsistent."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_variables(path: str | os.PathLike, variables: Any) -> None:
    """Saves a pytree of arrays with orbax (``path`` must not exist)."""
    variables = jax.tree.map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), variables)


def load_variables(path: str | os.PathLike) -> dict:
    """Restores a pytree saved by :func:`save_variables`, as host numpy arrays."""
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(path))
    return jax.tree.map(np.asarray, restored)


def save_model(
    path: str | os.PathLike,
    *,
    config: Config,
    classes: list[str] | tuple[str, ...],
    variables: Any,
    kind: str = "action",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Writes a complete model directory atomically, replacing any previous one at ``path``.

    Args:
      path: the model directory to create or replace.
      config: the resolved config; ``config.model.num_classes`` must equal ``len(classes)``.
      classes: class names, index i = logit i.
      variables: ``{"params": ..., "batch_stats": ...}``.
      kind: "action" (a CNN-LSTM) or "imagenet" (the per-frame ImageNet classifier).
      metadata: extra JSON-able facts stored in labels.json (source, metrics, ...).

    Returns:
      The final path.
    """
    path = Path(path)
    if len(classes) != config.model.num_classes:
        raise ValueError(
            f"{len(classes)} class names for a model with {config.model.num_classes} outputs"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_variables(tmp / VARIABLES_DIR, variables)
        (tmp / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        labels = {"classes": list(classes), "kind": kind, **(metadata or {})}
        (tmp / LABELS_FILE).write_text(json.dumps(labels, indent=2), encoding="utf-8")
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_model(path: str | os.PathLike) -> tuple[Config, dict[str, Any], dict]:
    """Reads a model directory.

    Returns:
      (config, labels, variables): labels is the parsed labels.json (``labels["classes"]``).

    Raises:
      CheckpointError: naming the missing or inconsistent file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    for name in (CONFIG_FILE, LABELS_FILE, VARIABLES_DIR):
        if not (path / name).exists():
            raise CheckpointError(f"{path} is not a model directory: {name} is missing")
    try:
        config = Config.from_json((path / CONFIG_FILE).read_text(encoding="utf-8"))
        labels = json.loads((path / LABELS_FILE).read_text(encoding="utf-8"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable config or labels: {e}") from e
    classes = labels.get("classes")
    if not isinstance(classes, list) or len(classes) != config.model.num_classes:
        raise CheckpointError(
            f"{path / LABELS_FILE}: expected {config.model.num_classes} class names, "
            f"got {classes!r:.200}"
        )
    variables = load_variables(path / VARIABLES_DIR)
    return config, labels, variables
