"""Multi-host training: two `har-train` processes on this machine act as two hosts.

They meet through `jax.distributed.initialize()` (the environment variables README gives),
each with 2 CPU devices, and share one work directory as hosts share a disk. Stopped and
resumed, together they must train the same trajectory as one process with 4 devices, and
write one set of outputs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_webui_support import free_port

from har_flax.data.synthetic import write_synthetic_kaggle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAR_TRAIN = os.path.join(os.path.dirname(sys.executable), "har-train")
# A small learning rate keeps the comparison about the distribution (see test_sharding.py).
# The plateau schedule: its rule runs on the host between epochs, on every process.
SETTINGS = ["--config", "tiny", "--no-progress", "--set", "train.batch_size=8",
            "--set", "train.epochs=2", "--set", "train.learning_rate=1e-4",
            "--set", "model.bn_momentum=0.9", "--set", "model.depthwise_impl=conv",
            "--set", "train.lr_schedule=plateau", "--set", "train.plateau_patience=1"]  # fmt: skip


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra
    )
    return env


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_kaggle(
        tmp_path_factory.mktemp("mh") / "data", train_per_class=12, test_count=2, seed=3
    )


def _start_two(command: list[str], address: str, stderr: int) -> list[subprocess.Popen]:
    """Starts ``command`` as processes 0 and 1 of one distributed run, 2 CPU devices each."""
    return [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=_env(
                2,
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                PYTHONUNBUFFERED="1",
            ),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        for i in range(2)
    ]


def _two_processes(
    command: list[str],
    address: str,
    timeout: float = 400,
    *,
    term_process_1_after: str | None = None,
    returncode: int = 0,
) -> list[tuple[str, str]]:
    """Runs ``command`` as processes 0 and 1 of one distributed run; returns (stdout, stderr).

    Args:
      term_process_1_after: send SIGTERM to process 1 alone once process 0 has logged a line
        (on stderr) holding this: a preemption notice that reaches one host first.
      returncode: what both processes must exit with.
    """
    procs = _start_two(command, address, stderr=subprocess.PIPE)
    try:
        head = ""
        if term_process_1_after is not None:
            for line in procs[0].stderr:
                head += line
                if term_process_1_after in line:
                    procs[1].send_signal(signal.SIGTERM)
                    break
        outs = [p.communicate(timeout=timeout) for p in procs]
        outs[0] = (outs[0][0], head + outs[0][1])
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    # Both processes' ends: the one that failed first is not always the one that says why.
    assert codes == [returncode] * 2, "\n".join(
        f"--- process {i} (exit status {code}) ---\n{err[-3000:]}"
        for i, (code, (_, err)) in enumerate(zip(codes, outs, strict=True))
    )
    return outs


def test_two_processes_train_and_resume_like_one(data_dir, tmp_path):
    shared = tmp_path / "two"  # both "hosts" use it, data preparation included
    command = [HAR_TRAIN, "--data-dir", str(data_dir), "--workdir", str(shared), *SETTINGS]
    # Stopped in the middle of epoch 2 (3 steps per epoch), then the same command again.
    # One coordinator address for both starts, as a restarted job has: it is part of the key of
    # every compiled program in JAX's cache.
    address = f"127.0.0.1:{free_port()}"
    (out0, err0), (out1, _) = _two_processes([*command, "--max-steps", "4"], address)
    assert "stopped at step 4" in out0 and "stopped at step 4" in out1
    assert f"kept in {shared / 'jax_cache'} for a restart" in err0
    # Resumed, then preempted: SIGTERM reaches process 1 alone, once both restored step 4 (the
    # step's compile follows, seconds). Stopping alone at its next step, it left process 0
    # waiting in that step's collective for ever (both hung); they agree on a step (each one
    # here: log_every_steps=1) and stop there together, with SIGTERM's exit status.
    (out0, _), (out1, _) = _two_processes(
        [*command, "--set", "train.log_every_steps=1"], address,
        term_process_1_after="resuming from step 4", returncode=128 + signal.SIGTERM,
    )  # fmt: skip
    stops = [re.search(r"stopped at step (\d+)", out) for out in (out0, out1)]
    assert stops[0] and stops[1] and stops[0][1] == stops[1][1] in ("4", "5"), (out0, out1)
    (out0, err0), (out1, _) = _two_processes(command, address)
    assert "best validation accuracy" in out0 and "best validation accuracy" in out1
    # The restart reused the programs the first start compiled (W/jax_cache). Only process 0
    # writes that cache, and on a CPU each process's key holds its own devices, so process 1
    # compiles again here (on a GPU, JAX leaves the devices out of the key).
    loaded = re.search(r"(\d+) programs came from the compilation cache (\S+)", err0)
    assert loaded and int(loaded[1]) >= 2 and loaded[2] == str(shared / "jax_cache"), err0

    one = tmp_path / "one"
    single = subprocess.run(
        [HAR_TRAIN, "--data-dir", str(data_dir), "--workdir", str(one), *SETTINGS],
        cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    two, ref = _metrics(shared), _metrics(one)
    assert [r["epoch"] for r in two] == [1, 2]  # written once, by process 0
    assert [r["step"] for r in two] == [r["step"] for r in ref] == [3, 6]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in ref], rtol=1e-3,
                                   err_msg=key)  # fmt: skip
    assert two[0]["train_loss"] != two[1]["train_loss"]  # it trained
    # One exported model and one set of checkpoints, as a single process writes them.
    assert sorted(os.listdir(shared / "model")) == sorted(os.listdir(one / "model"))
    assert sorted(os.listdir(shared / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
    assert (shared / "split.json").read_text() == (one / "split.json").read_text()


def test_two_processes_save_best_and_latest_in_the_background(tmp_path):
    # fit saves "best" and then "latest" at the end of an epoch, both in the background. Across
    # processes, orbax's background threads meet at barriers with fixed names: without a name
    # of its own per checkpoint kind, a "best" thread met another process's "latest" thread
    # ("Barrier ThreadSaveMultiHostValueHolder:set_value_start is already ongoing"), and the
    # run hung (every time, with 29 saves).
    worker = os.path.join(REPO, "tests", "multihost_checkpoint_worker.py")
    saves = 29
    outs = _two_processes(
        [sys.executable, worker, str(tmp_path / "checkpoints"), str(saves)],
        f"127.0.0.1:{free_port()}",
        timeout=120,
    )
    last_best = max(s for s in range(1, saves + 1) if s % 3)
    for i, (out, _) in enumerate(outs):
        read = json.loads(out.strip().splitlines()[-1])
        assert read["process"] == i
        for which, step in (("best", last_best), ("latest", saves)):
            assert read[which] == {
                "saved_step": step, "step": step, "w": [step, step], "progress": {"epoch": step}
            }, which  # fmt: skip
    # One copy on the shared disk, no unfinished folder left behind.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best", "latest"]
    assert os.listdir(tmp_path / "checkpoints" / "latest") == [str(saves)]
    assert os.listdir(tmp_path / "checkpoints" / "best") == [str(last_best)]


def test_a_process_that_fails_alone_lets_the_others_stop(data_dir, tmp_path):
    # Process 0 fails on its own at the end of an epoch (its metrics file has become a
    # directory: a disk fault on one host). It used to wait in jax.distributed's shutdown
    # barrier while process 1 waited in its next collective: both hung for the barrier's
    # 5 minutes, then aborted. Now process 0 exits with its error and status 1 once no other
    # process has failed with it (a 10 s barrier), and JAX stops process 1 at once.
    shared = tmp_path / "w"
    command = [HAR_TRAIN, "--data-dir", str(data_dir), "--workdir", str(shared), *SETTINGS,
               "--set", "train.epochs=40", "--set", "train.early_stopping_patience=40"]  # fmt: skip
    address = f"127.0.0.1:{free_port()}"
    procs = _start_two(command, address, stderr=subprocess.STDOUT)
    try:
        head = ""
        for line in procs[0].stdout:
            head += line
            if re.match(r"epoch 1/40: ", line):
                (shared / "metrics.jsonl").unlink()
                (shared / "metrics.jsonl").mkdir()
                break
        # Minutes before this change; seconds now (each waits up to 120 s here).
        out0 = head + procs[0].communicate(timeout=120)[0]
        out1 = procs[1].communicate(timeout=120)[0]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, out0[-3000:]
    assert "har-train: error: [Errno 21] Is a directory" in out0
    assert "process 0 failed alone; exiting without waiting" in out0
    assert procs[1].returncode != 0 and "another task died" in out1, out1[-3000:]


def test_processes_that_fail_together_exit_as_usual(tmp_path):
    # Bad data stops every process with the same error (sharding.process_zero_first): they meet
    # at the failed processes' barrier and exit as usual, each with status 1 and its message.
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=6, test_count=2, seed=4)
    (data / "train" / "Image_2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    command = [HAR_TRAIN, "--data-dir", str(data), "--workdir", str(tmp_path / "w"), *SETTINGS]
    outs = _two_processes(command, f"127.0.0.1:{free_port()}", timeout=120, returncode=1)
    for _, err in outs:
        assert "train/Image_2.jpg is unreadable" in err, err
        assert "all 2 processes of the run failed" in err and "failed alone" not in err, err
