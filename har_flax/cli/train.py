"""``har-train``: trains the CNN-LSTM on a Kaggle-layout data set; resumes when run again.

Everything lands in the work directory W: ``config.json``, ``split.json``, ``checkpoints/``
(latest and best), ``model/`` (the best model, for ``har-serve --model W/model``),
``metrics.jsonl`` and ``curves.png``; see :mod:`har_flax.train`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from har_flax.cli import out_dir_problem, print_skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="har-train",
        description="Train the action recognizer. Run the same command again to resume.",
        epilog=(
            "Examples: har-train --data-dir data/har --workdir runs/har\n"
            "          har-train --data-dir data/har --workdir runs/gpu "
            "--set model.dtype=bfloat16 --set train.batch_size=256"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="directory with Training_set.csv, Testing_set.csv, train/ and test/",
    )
    parser.add_argument("--workdir", required=True, type=Path, help="run directory W")
    parser.add_argument(
        "--config",
        default=None,
        help="preset: default (224px, ImageNet weights), smoke (a 2-minute CPU run that learns "
        "the synthetic set) or tiny (for tests); or a config .json file. Without it: the saved "
        "settings (W/config.json) when W holds a run, else default",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. train.epochs=10 (repeatable)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop (with a checkpoint) at this global step; run again to continue",
    )
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="where prepared arrays are cached (default W/tfds); share it between runs",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (training, and a first-time dataset build)",
    )
    return parser


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``; ValueError naming a malformed item."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    """Trains; returns 0 (finished, or stopped at --max-steps), 1 (bad data/config, or the
    loss diverged), 2 (usage), 128 + the signal's number when SIGINT (130) or SIGTERM (143)
    stopped it (with a checkpoint once training was set up): run it again to go on."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 0:
        parser.error(f"--max-steps must be 0 or more (a global step), got {args.max_steps}")
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    for flag, path in (("--workdir", args.workdir), ("--download-dir", args.download_dir)):
        if path is not None and (problem := out_dir_problem(flag, path)):
            parser.error(problem)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Ctrl-C before the training loop (importing JAX, preparing the data) ends the command;
    # from fit on, it saves a checkpoint and stops at the next step instead.
    try:
        with _Interrupts() as interrupts:
            code = _train(parser, args, interrupts)
    except KeyboardInterrupt:
        print(
            "har-train: interrupted; the same command goes on from the latest checkpoint, if "
            "one was saved (a data preparation cut off starts over)",
            file=sys.stderr,
        )
        return 130
    except Exception:
        if _failed_alone():
            traceback.print_exc()
            _exit_now(1)
        raise
    if code == 1 and _failed_alone():
        _exit_now(1)
    return code


# How long a failed process of a multi-process run waits for the others to fail too.
FAILED_TOGETHER_TIMEOUT_S = 10


def _failed_alone() -> bool:
    """In a multi-process (multi-host) run that failed: whether the other processes did not.

    Waits up to FAILED_TOGETHER_TIMEOUT_S at a barrier that only failed processes reach. When
    every process fails (bad data or settings, a diverged loss: the same on each), all meet
    there and exit as usual. When one fails alone (a disk error on one host, a bug), the others
    are waiting in their next collective and never come.
    """
    jax = sys.modules.get("jax")
    if jax is None or jax.process_count() == 1:
        return False
    from orbax.checkpoint import multihost  # noqa: PLC0415

    try:
        multihost.sync_global_processes(
            "har-train-failed",
            timeout=FAILED_TOGETHER_TIMEOUT_S,
            processes=set(range(jax.process_count())),
        )
    except Exception:  # the barrier timed out (or the coordination service is gone)
        return True
    print(f"har-train: all {jax.process_count()} processes of the run failed", file=sys.stderr)
    return False


def _exit_now(code: int) -> None:
    """Exits at once, without the distributed shutdown's barrier.

    A process that failed alone waited in `jax.distributed.shutdown`'s barrier at exit, and the
    others in their next collective: all hung for the barrier's 5-minute timeout, then
    aborted. Gone at once, it lets JAX's coordination service stop the others: at once when
    this is process 0 (the service's host), else once its heartbeats are missed (about 80 s
    on a CPU).
    """
    print(
        f"har-train: process {sys.modules['jax'].process_index()} failed alone; exiting "
        "without waiting for the run's other processes (JAX stops them)",
        file=sys.stderr,
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Interrupts:
    """While entered, SIGINT raises KeyboardInterrupt and is remembered (main thread only).

    Remembered because Python drops an exception raised in a garbage-collector callback or a
    ``__del__`` ("Exception ignored in ..."), and JAX runs one at every collection: such a
    Ctrl-C was lost and the run went on to the end. :meth:`check` raises it again. Python's
    report of the dropped interrupt (a traceback on stderr) is left out: it is no error.
    """

    def __init__(self) -> None:
        self.seen = False
        self._installed = False
        self._previous = None
        self._previous_hook = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            if self._previous is not None:  # None: not set from Python, so not restorable
                signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._previous_hook
            self._installed = False

    def _unraisable(self, unraisable: Any) -> None:
        if not (self.seen and unraisable.exc_type is KeyboardInterrupt):
            self._previous_hook(unraisable)

    def _handler(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raises KeyboardInterrupt if a Ctrl-C came (and was dropped on its way)."""
        if self.seen:
            raise KeyboardInterrupt


def _train(
    parser: argparse.ArgumentParser, args: argparse.Namespace, interrupts: _Interrupts
) -> int:
    from har_flax import sharding, train  # noqa: PLC0415 (--help answers without importing JAX)
    from har_flax.checkpoint import CheckpointError
    from har_flax.config import get_config, override
    from har_flax.data import DataError, load_splits

    saved = args.workdir / train.CONFIG_FILE
    use_saved = args.config is None and saved.is_file()
    name = str(saved) if use_saved else args.config or "default"
    try:
        config = override(get_config(name), parse_overrides(args.overrides))
    except ValueError as e:
        parser.error(str(e))
    if use_saved:
        print(f"har-train: going on with the run's saved settings ({saved})", file=sys.stderr)
    sharding.maybe_initialize_distributed()

    try:
        # One run per work directory, from preparing its data to its last checkpoint.
        with train.workdir_lock(args.workdir):
            train.check_resume(args.workdir, config)  # before the data is prepared
            splits = sharding.process_zero_first(
                lambda: load_splits(
                    args.data_dir,
                    args.workdir,
                    image_size=config.model.image_size,
                    data_config=config.data,
                    download_dir=args.download_dir,
                    progress=not args.no_progress,
                ),
                "har_flax:load_splits",
            )
            interrupts.check()
            print_skipped("har-train", splits.skipped, "data.skip_bad_images")
            print_skipped(
                "har-train",
                splits.test_skipped,
                "Testing_set.csv / test/, which training does not read",
                "; har-evaluate refuses them until they are fixed or it is given --skip-bad-images",
            )
            interrupts.check()
            result = train.fit(
                config,
                args.workdir,
                splits=splits,
                max_steps=args.max_steps,
                progress_bar=not args.no_progress,
            )
    except (DataError, ValueError, OSError, CheckpointError, train.TrainingDivergedError) as e:
        print(f"har-train: error: {e}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"stopped at step {int(result.state.step)}; run the same command to resume")
        if result.stopped_by_signal is not None:
            # Not 0: a job runner (a Kubernetes Job, a retry loop) must not take a preempted
            # run for a finished one.
            return 128 + result.stopped_by_signal
    else:
        print(
            f"best validation accuracy {result.best_val_accuracy:.4f}"
            + (" (stopped early)" if result.stopped_early else "")
            + f"; model: {args.workdir / train.MODEL_DIR}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
