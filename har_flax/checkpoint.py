"""Checkpoints on disk, the only module that imports orbax.

A *model directory* is what the server loads and what ``har-port-weights`` writes::

    DIR/config.json    the resolved Config (JSON)
    DIR/labels.json    {"classes": [...], "kind": "action" | "imagenet", ...metadata}
    DIR/variables/     orbax StandardCheckpointer tree {"params", "batch_stats"}

It is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written model directory where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from har_flax.config import Config
from har_flax.logs import without_absl_notices

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
VARIABLES_DIR = "variables"


class CheckpointError(RuntimeError):
    """A model directory is missing, incomplete or inconsistent."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and an atomic rename.

    The file gets the permissions ``open`` would give it (0o666 less the umask), not the
    temporary file's private 0o600: reports and models are for others to read too.
    """
    atomic_write_files({path: data})


def atomic_write_files(files: dict[str | os.PathLike, bytes]) -> None:
    """Writes several files as one: each to a temporary file beside it, all of them to disk,
    and only then each renamed over its path.

    A failure while writing (a full disk) replaces none of them, so a set of files that
    belong together (a report, its charts and its submission) is never left half old, half
    new; only the renames, a few microseconds that need no disk space, come one by one.
    Permissions as :func:`atomic_write_bytes`.
    """
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            written.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                os.fsync(f.fileno())
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process' umask, read without changing it where Linux allows (other threads may be
    creating files, and would get a momentarily cleared umask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # elsewhere: the only way to read it, set straight back
    os.umask(mask)
    return mask


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
    """An orbax checkpointer of host arrays that only the calling process takes part in.

    A model is exported by one process (process 0 of a multi-host run) and loaded by whichever
    needs it; orbax's default would wait at a barrier for every process of the run.
    """
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def save_variables(path: str | os.PathLike, variables: Any) -> None:
    """Saves a pytree of arrays with orbax (``path`` must not exist), from this process alone."""
    variables = jax.tree.map(np.asarray, variables)
    with _this_process_checkpointer() as ckptr:
        ckptr.save(os.path.abspath(path), variables)


def load_variables(path: str | os.PathLike) -> dict:
    """Restores a pytree saved by :func:`save_variables`, as host numpy arrays."""
    _quiet_late_reads()
    with _this_process_checkpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(path))
    return jax.tree.map(np.asarray, restored)


def _quiet_late_reads() -> None:
    """Keeps the reads a failed restore leaves behind from printing tracebacks.

    orbax runs a restore in an event loop of its own, and closes it as soon as one array fails
    to read (a truncated file). tensorstore then finishes the other reads, and each completion
    calls back into the closed loop: "RuntimeError: Event loop is closed" tracebacks; and a
    read task that failed too, which nobody awaits, is reported by asyncio as it is collected
    ("Task exception was never retrieved"). Those results are unwanted, and their reports
    can come before the restore's own error reaches its caller, so this is installed before
    every restore (once per process): from then on exactly those reports are dropped, and
    every other one goes to the hook (or the handlers) it had.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_har_flax_quiet", False):
        return

    def hook(unraisable) -> None:
        late = (
            isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and any(
                frame.name == "call_soon_threadsafe"
                for frame in traceback.extract_tb(unraisable.exc_traceback)
            )
        )
        if not late:
            previous(unraisable)

    hook._har_flax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_read_failures)


def _drop_unretrieved_read_failures(record: logging.LogRecord) -> bool:
    """asyncio's report of a tensorstore read that failed in a task nobody awaited."""
    error = record.exc_info[1] if record.exc_info else None
    return not (
        str(record.msg).startswith("Task exception was never retrieved")
        and error is not None
        and _unreadable(error)
    )


# How tensorstore words a read that failed (the file is short, missing or corrupt), as opposed
# to orbax's own refusals of a checkpoint that does not fit (structure, shapes).
_READ_FAILURE = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INTERNAL): ")


def _unreadable(error: BaseException) -> bool:
    return bool(_READ_FAILURE.match(str(error))) or "Error reading" in str(error)


def _orbax_words(error: BaseException) -> str:
    """orbax's (tensorstore's) message without the spec tensorstore appends: a kilobyte of
    JSON that says nothing to a person."""
    return str(error).split(" [tensorstore_spec=", 1)[0]


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

    Only a model directory (or an empty one) is replaced: anything else at ``path`` is refused,
    so a mistyped path (``--out ~``) cannot delete a user's files. Leftovers of saves that were
    killed (``.NAME.tmp-*``, ``.NAME.old-*`` beside ``path``) are removed first.

    Args:
      path: the model directory to create or replace.
      config: the resolved config; ``config.model.num_classes`` must equal ``len(classes)``.
      classes: class names, index i = logit i.
      variables: ``{"params": ..., "batch_stats": ...}``.
      kind: "action" (a CNN-LSTM) or "imagenet" (the per-frame ImageNet classifier).
      metadata: extra JSON-able facts stored in labels.json (source, metrics, ...).

    Returns:
      The final path.

    Raises:
      CheckpointError: ``path`` is a file, or a directory holding something else than a model.
      ValueError: ``classes`` does not match ``config``, or ``metadata`` would set
        ``classes`` or ``kind`` (which would relabel the outputs).
    """
    path = Path(path)
    if len(classes) != config.model.num_classes:
        raise ValueError(
            f"{len(classes)} class names for a model with {config.model.num_classes} outputs"
        )
    if clash := sorted({"classes", "kind"} & set(metadata or {})):
        raise ValueError(f"metadata cannot set {clash}: pass classes and kind as arguments")
    # The real name: "." or "runs/.." cannot be renamed, and the siblings go beside the target.
    path = path.resolve()
    check_model_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
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


MODEL_FILES = (CONFIG_FILE, LABELS_FILE, VARIABLES_DIR)
# A save in flight leaves its temporary directory younger than this; older ones were killed.
_STALE_TMP_SECONDS = 3600


def check_model_destination(path: str | os.PathLike) -> None:
    """Refuses a ``save_model`` target that holds anything but a model (or nothing).

    Raises:
      CheckpointError: naming what is there and what to do.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a model directory; choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{parent} is a file, so {path} cannot be created")
            break
    if not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir())
    if names and not all((path / n).exists() for n in MODEL_FILES):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointError(
            f"{path} exists and is not a model directory (it holds {shown}); a model replaces "
            "its whole directory, so choose a new or empty directory"
        )


def _remove_leftovers(path: Path) -> None:
    """Removes what killed saves left beside ``path`` (a live save's fresh tmp dir stays)."""
    now = time.time()
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        kind = sibling.name[len(path.name) + 2 :].split("-", 1)[0]
        try:
            stale = kind == "old" or (
                kind == "tmp" and now - sibling.stat().st_mtime > _STALE_TMP_SECONDS
            )
        except OSError:
            continue
        if stale and sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)


def load_model(path: str | os.PathLike) -> tuple[Config, dict[str, Any], dict]:
    """Reads a model directory.

    Returns:
      (config, labels, variables): labels is the parsed labels.json (``labels["classes"]``).

    Raises:
      CheckpointError: naming the missing or inconsistent file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a model is a directory (config.json, ...)")
    for name in MODEL_FILES:
        if not (path / name).exists():
            hint = ""
            if (path / "model" / CONFIG_FILE).exists():  # har-train's work directory
                hint = f"; it looks like a training work directory: its model is {path / 'model'}"
            raise CheckpointError(f"{path} is not a model directory: {name} is missing{hint}")
    damaged = "the model directory is damaged: train, save or port it again"
    try:
        config = Config.from_json((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is unreadable ({e}); {damaged}") from e
    try:
        labels = json.loads((path / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / LABELS_FILE} is unreadable ({e}); {damaged}") from e
    if not isinstance(labels, dict):
        raise CheckpointError(
            f'{path / LABELS_FILE} must be a JSON object with "classes", not '
            f"{type(labels).__name__}; {damaged}"
        )
    classes = labels.get("classes")
    if not isinstance(classes, list) or len(classes) != config.model.num_classes:
        raise CheckpointError(
            f"{path / LABELS_FILE}: expected {config.model.num_classes} class names, "
            f"got {classes!r:.200}"
        )
    try:
        variables = load_variables(path / VARIABLES_DIR)
    except (OSError, ValueError, KeyError, TypeError) as e:
        # orbax's own words (a missing _METADATA, an incomplete checkpoint, a truncated array).
        raise CheckpointError(
            f"{path / VARIABLES_DIR}: the weights are unreadable ({_orbax_words(e)}); {damaged}"
        ) from e
    return config, labels, variables


# --- Training checkpoints ------------------------------------------------------------------------
#
# A training work directory keeps two orbax CheckpointManagers, one step each:
#
#     W/checkpoints/latest/<step>/{state,progress}   resumed from when training restarts
#     W/checkpoints/best/<step>/{state,progress}     the best validation accuracy so far
#
# ``state`` is the whole train state (params, batch_stats, optimiser state, step); ``progress`` is
# JSON: the data-iterator position (epoch, step in epoch), early-stopping counters, running
# metric sums, the resolved config and the class names.

TRAIN_CHECKPOINTS_DIR = "checkpoints"
_STATE_ITEM = "state"
_PROGRESS_ITEM = "progress"
# orbax's "Waiting for previous save to complete took ... consider checkpointing less
# frequently", not shown: a run of short epochs (a small data set) waits for its previous save
# every epoch, and har-train saves once per epoch, which is what it needs to resume.
ORBAX_WAIT_NOTICE = "Waiting for previous save to complete"


def saved_progress(directory: str | os.PathLike, which: str = "latest") -> dict[str, Any] | None:
    """The ``progress`` JSON of the kept ``which`` checkpoint under ``directory``, read as a
    file, without orbax (cheap, no managers, no barriers); None when there is none, or it
    cannot be read (restoring it then says why)."""
    folder = Path(directory) / which
    try:
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        # orbax's JsonSave writes the item as <step>/<item>/metadata.
        text = (folder / str(max(steps)) / _PROGRESS_ITEM / "metadata").read_text("utf-8")
        return json.loads(text)["progress"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TrainCheckpoints:
    """The latest and the best training checkpoint of a work directory.

    Saves are asynchronous: :meth:`save` returns once the arrays are copied to host memory (so
    the next train step may donate the device buffers) and a background thread writes them;
    training goes on meanwhile. Each checkpoint appears on disk only when complete (orbax writes
    a temporary folder and renames it), so a run killed mid-save resumes from the one before.
    Every other method, and the next save of the same kind, first waits for the save in flight.
    The same holds with several processes (multi-host): there, the two managers' background
    threads meet the other processes at barriers, so each manager names its own (see below).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        self._managers: dict[str, ocp.CheckpointManager] = {}
        # Each manager removes a killed save's unfinished folder in a thread of its own, which
        # its close() does not wait for; one still running when the process exits (Ctrl-C as
        # a run starts) died there with a traceback. So the managers are built, and their
        # clean-ups waited for (a directory listing), with Ctrl-C and SIGTERM held back.
        with _signals_held(signal.SIGINT, signal.SIGTERM):
            try:
                for name in ("latest", "best"):
                    self._managers[name] = self._manager(name)
                    _await_tmp_cleanup(self._managers[name])
            except BaseException:
                self.close()
                raise

    def _manager(self, name: str) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory / name,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                enable_async_checkpointing=True,
                # The unfinished folder of a save cut off by a kill.
                cleanup_tmp_directories=True,
                # Multi-host: orbax's barriers have fixed names, and a "best" save's
                # background thread would meet another process's "latest" thread at the
                # same one ("Barrier ... is already ongoing", then a hang).
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=f"har_{name}"
                ),
            ),
            item_names=(_STATE_ITEM, _PROGRESS_ITEM),
        )

    def latest_step(self, which: str = "latest") -> int | None:
        """The step of the kept checkpoint, or None when there is none yet."""
        manager = self._managers[which]
        manager.wait_until_finished()
        return manager.latest_step()

    def save(self, which: str, step: int, state: Any, progress: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of arrays) and ``progress`` (JSON) as ``which`` at ``step``.

        Args:
          which: "latest" or "best".
          step: the global optimiser step; a second save at the same step replaces the first.
          state: the train state pytree.
          progress: JSON-able facts needed to resume.
        """
        manager = self._managers[which]
        if self.latest_step(which) == step:
            manager.delete(step)
        if jax.process_count() == 1:
            # Host copies, taken now (the caller may donate the device buffers next): orbax
            # writes numpy arrays in half the time it takes for jax.Arrays (its cost is per
            # array, and a train state has ~650: 0.45 against 0.95 s a save on a CPU). Restored,
            # they are jax.Arrays placed as ``abstract_state`` says. Not across processes: there,
            # orbax's numpy path deadlocked now and then (test_multihost.py hung in 1 run of 6,
            # and 1 of 13 two-process starts in a loop: process 1 waiting for a signal of
            # process 0, which waited at a barrier).
            state = jax.device_get(state)
        args = {
            _STATE_ITEM: ocp.args.StandardSave(state),
            # A copy: the caller goes on changing its dict while this is written.
            _PROGRESS_ITEM: ocp.args.JsonSave(json.loads(json.dumps(progress))),
        }
        with without_absl_notices(ORBAX_WAIT_NOTICE):
            manager.save(step, args=ocp.args.Composite(**args))

    def restore(self, which: str, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restores the kept checkpoint into the structure (and shardings) of ``abstract_state``.

        Args:
          which: "latest" or "best".
          abstract_state: a pytree like the saved state, of arrays or ``jax.ShapeDtypeStruct``s
            whose shardings say where the restored arrays go.

        Returns:
          (state, progress), or None when no checkpoint exists.

        Raises:
          CheckpointError: the checkpoint does not fit ``abstract_state`` (another model config).
        """
        manager = self._managers[which]
        step = self.latest_step(which)
        if step is None:
            return None
        _quiet_late_reads()
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                        _PROGRESS_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            where = f"checkpoint {self.directory / which} (step {step})"
            if _unreadable(e):
                raise CheckpointError(
                    f"{where} is damaged: {_orbax_words(e)}. Its files were cut short or "
                    "changed after it was saved, so the run cannot go on from it: start it in a "
                    "new work directory, or put back a whole copy of this one"
                ) from e
            raise CheckpointError(
                f"{where} does not match this model: {_orbax_words(e)}. Train in a fresh work "
                "directory or restore the config it was made with."
            ) from e
        return restored[_STATE_ITEM], dict(restored[_PROGRESS_ITEM])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()
            manager.close()


@contextlib.contextmanager
def _signals_held(*signums: int) -> Iterator[None]:
    """Delivers ``signums`` arriving in the block when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


def _await_tmp_cleanup(manager: ocp.CheckpointManager) -> None:
    """Waits for ``manager``'s clean-up of unfinished folders (orbax's own save waits too)."""
    # A private method of orbax's; where it is missing, a save still waits for the clean-up.
    wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait is not None:
        wait()
