"""scripts/bench_train.py runs on the CPU and reports what it measured (not how fast)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from har_flax.data.synthetic import write_synthetic_kaggle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_with_stderr(*args: str, env: dict | None = None) -> tuple[dict, str]:
    """Runs bench_train.py; returns its JSON result and its stderr."""
    out = subprocess.run(
        [sys.executable, "scripts/bench_train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{") :]), out.stderr


def _run(*args: str) -> dict:
    return _run_with_stderr(*args)[0]


def test_step_epoch_input_path_and_profile_on_memory(tmp_path):
    # (A compilation cache, so that the profile's ahead-of-time compile can reuse the step's.)
    r, err = _run_with_stderr(
        "--config", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--repeats", "1", "--epoch-images", "24", "--profile", str(tmp_path / "trace"),
        "--profile-steps", "2", "--set", "model.pretrained=tflite",
        # (bench_gpu.sh traces the GPU without CUDA graphs; the flag is accepted on a CPU too.)
        env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
             "XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
    )  # fmt: skip
    assert r["device"] and r["source"] == "memory" and r["epoch_images"] == 24
    assert r["xla_flags"] == "--xla_gpu_enable_command_buffer="  # it changes the program: said
    # A pretrained config's step, as it trains: its backbone BatchNorm frozen (no weights are
    # loaded: they do not change the speed).
    assert r["backbone_batchnorm_frozen"] is True
    assert r["batch_size"] == 8 and len(r["step_ms_each_repeat"]) == 1
    assert r["train_step_images_per_sec"] > 0 and r["epoch_seconds"] > 0
    assert r["input_images_per_sec"] > 0
    # 1 warm-up, 2 timed and 3 epoch steps, none skipped.
    assert r["nonfinite_steps"] == 0 and math.isfinite(r["final_loss"])
    # Where the step's time went, by part of the step: every part of the model, the on-device
    # augmentation and the optimiser were found in the trace and attributed.
    assert "profile_ms_per_step" not in r  # the timings were printed before the profile ran
    parts = json.loads(err.split("profile_ms_per_step ", 1)[1].splitlines()[0])
    for part in ("backbone forward", "backbone backward", "lstm forward", "lstm backward",
                 "head forward", "head backward", "augment", "optimizer"):  # fmt: skip
        assert parts.get(part, 0) > 0, (part, parts)
    assert parts["backbone backward"] + parts["backbone forward"] > 0.5 * sum(parts.values())
    assert "| part | ms per step | share |" in err and "block_1_depthwise" in err


def test_input_only_on_prepared_data(tmp_path):
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=8, test_count=2, seed=1)
    r = _run("--config", "tiny", "--batch-size", "4", "--repeats", "2", "--input-only",
             "--data-dir", str(data), "--workdir", str(tmp_path / "work"))  # fmt: skip
    assert r["source"] == "prepared arrays"
    assert len(r["input_images_per_sec_each_repeat"]) == 2 and r["input_images_per_sec"] > 0
    assert "train_step_images_per_sec" not in r  # no model was built
    # The split it read is the run's stratified training split: 3 classes x 8, 20% held out.
    assert r["epoch_images"] == 16


def test_profile_attributes_ops_by_their_source():
    from har_flax.profiling import op_sources, part_of

    hlo = """HloModule jit__train_step, entry_computation_layout={()->()}
  %fusion.3 = bf16[8]{0} fusion(%p), kind=kLoop, calls=%fc.3, metadata={op_name="jit(_train_step)/transpose(jvp(CNNLSTM))/vmap(backbone)/block_1_depthwise/mul" source_file="m.py"}
  ROOT %dot.2 = f32[8]{0} dot(%a, %b), metadata={op_name="jit(_train_step)/augment/vmap()/dot_general"}
  %add.1 = f32[] add(%x, %y)
"""  # noqa: E501
    assert op_sources(hlo) == {
        "fusion.3": "jit(_train_step)/transpose(jvp(CNNLSTM))/vmap(backbone)/block_1_depthwise/mul",
        "dot.2": "jit(_train_step)/augment/vmap()/dot_general",
    }
    cases = {
        "jit(_train_step)/transpose(jvp(CNNLSTM))/vmap(backbone)/block_1_depthwise/mul":
            "backbone backward",
        "jit(_train_step)/jvp(CNNLSTM)/vmap(backbone)/Conv_1/conv": "backbone forward",
        "jit(_train_step)/jvp(CNNLSTM)/lstm/cell/dot_general": "lstm forward",
        "jit(_train_step)/transpose(jvp(CNNLSTM))/lstm/while/body/add": "lstm backward",
        "jit(_train_step)/jvp(CNNLSTM)/dense_0/dot_general": "head forward",
        "jit(_train_step)/transpose(jvp(CNNLSTM))/logits/dot_general": "head backward",
        "jit(_train_step)/augment/vmap()/dot_general": "augment",
        "jit(_train_step)/optimizer/jit(_where)/select_n": "optimizer",
        "jit(_train_step)/square": "other",
        "": "other",
    }  # fmt: skip
    assert {source: part_of(source) for source in cases} == cases


def test_profile_names_cuda_graphs_it_cannot_break_down():
    # On the H200 (2026-11-27) 13 of the step's 20 ms were `command_buffer_N` ops: CUDA graphs,
    # no source path. They were counted as "other" (the loss, the bookkeeping), which misled.
    from har_flax.profiling import COMMAND_BUFFERS, OpTime, Profile, part_of

    assert part_of("", "command_buffer_823") == COMMAND_BUFFERS
    assert part_of("", "command_buffer") == COMMAND_BUFFERS
    assert part_of("", "fusion.3") == "other"  # an op without a source, not a graph
    src = "jit(_train_step)/jvp(CNNLSTM)/vmap(backbone)/Conv1/conv_general_dilated"
    assert part_of(src, "command_buffer_1") == "backbone forward"  # its source decides

    ops = [OpTime("command_buffer_823", COMMAND_BUFFERS, "", 13.327),
           OpTime("cudnn-conv.44", "backbone forward", src, 1.786)]  # fmt: skip
    table = Profile("/device:GPU:0", {COMMAND_BUFFERS: 13.327, "backbone forward": 1.786}, ops, 0)
    text = table.table()
    assert f"| {COMMAND_BUFFERS} | 13.327 | 88.2% |" in text, text
    assert "13.327 ms per step ran in CUDA graphs" in text, text
    assert "XLA_FLAGS=--xla_gpu_enable_command_buffer=" in text, text
    plain = Profile("/host:CPU", {"backbone forward": 1.786}, ops[1:], 0).table()
    assert "CUDA graphs" not in plain, plain
