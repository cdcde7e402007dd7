"""Where a compiled program's time goes: a jax.profiler trace summed per XLA op and per part.

Used by `scripts/bench_train.py --profile DIR` to show which part of the train step (the
augmentation, the backbone's forward or backward pass, the LSTM, the head, the optimiser) a
GPU spends its time on. Each op is attributed through the compiled HLO's `op_name` metadata,
the JAX source path of the op, which holds the Flax module names and the step's named scopes.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path

# `%name = ... metadata={op_name="jit(step)/jvp(Model)/backbone/..." ...}` in HLO text.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.MULTILINE)

# Ops whose events enclose their bodies' events on XLA:CPU (counted through the body instead).
_CONTROL_FLOW = re.compile(r"^(?:while|conditional|call)(?:\.\d+)?$")

# The parts of a train step, by what its op path contains, first match wins.
_SCOPED = (("/augment", "augment"), ("/optimizer", "optimizer"))
_MODULES = (("backbone", "backbone"), ("/lstm", "lstm"))


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name (the JAX source path), from compiled HLO text."""
    return {name: source for name, source in _INSTRUCTION.findall(hlo_text)}


# On a GPU, XLA launches sequences of kernels as CUDA graphs ("command buffers"): the trace
# shows each as one op, `command_buffer_N`, with no source path, whatever parts its kernels
# belong to.
_COMMAND_BUFFER = re.compile(r"^command_buffer(?:[._]\d+)?$")
COMMAND_BUFFERS = "CUDA graphs (not broken down)"
NO_COMMAND_BUFFERS = "XLA_FLAGS=--xla_gpu_enable_command_buffer="  # each kernel on its own


def part_of(source: str, op: str = "") -> str:
    """The part of a train step that an op with this op_name (and HLO name `op`) belongs to."""
    if not source and _COMMAND_BUFFER.match(op):
        return COMMAND_BUFFERS
    for key, part in _SCOPED:
        if key in source:
            return part
    if "jvp(" not in source:
        return "other"  # the loss, the gradient's norm, the step's bookkeeping
    direction = "backward" if "transpose(jvp(" in source else "forward"
    for key, part in _MODULES:
        if key in source:
            return f"{part} {direction}"
    return f"head {direction}"  # the dense layers, their BatchNorm and dropout, the logits


@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str  # the HLO instruction (or, unattributed, the kernel's name)
    part: str
    source: str
    ms_per_step: float


@dataclasses.dataclass(frozen=True)
class Profile:
    plane: str  # the trace's plane the events came from ("/device:GPU:0", "/host:CPU")
    parts: dict[str, float]  # part -> ms per step, largest first
    ops: list[OpTime]  # largest first
    unattributed_events: int  # events without an hlo_op (kernel names only)

    @property
    def ms_per_step(self) -> float:
        """The events' summed duration per step."""
        return sum(self.parts.values())

    def table(self, top: int = 25) -> str:
        """Markdown: the parts, then the `top` most expensive ops."""
        lines = [
            f"Profile ({self.plane}): {self.ms_per_step:.3f} ms of op time per step",
            "",
            "| part | ms per step | share |",
            "| --- | ---: | ---: |",
        ]
        for part, ms in self.parts.items():
            lines.append(f"| {part} | {ms:.3f} | {100 * ms / self.ms_per_step:.1f}% |")
        lines += ["", "| op | part | ms per step | source |", "| --- | --- | ---: | --- |"]
        for op in self.ops[:top]:
            source = op.source if len(op.source) <= 110 else "..." + op.source[-107:]
            lines.append(f"| {op.name} | {op.part} | {op.ms_per_step:.3f} | {source} |")
        if self.unattributed_events:
            lines.append(f"\n{self.unattributed_events} events had no hlo_op (kernel names shown).")
        if COMMAND_BUFFERS in self.parts:
            lines.append(
                f"\n{self.parts[COMMAND_BUFFERS]:.3f} ms per step ran in CUDA graphs, which the "
                f"trace does not break down by part: trace with {NO_COMMAND_BUFFERS} set to "
                "see each kernel (that also changes the step's time a little)."
            )
        return "\n".join(lines)


def summarize(trace_dir: Path, hlo_text: str, module: str, steps: int) -> Profile:
    """Sums the events of `module` (the jitted function's HLO module name, e.g. "jit__train_step")
    in the newest trace under `trace_dir`, per op and per part, divided by `steps`.

    Device planes (a GPU's kernels) are used when the trace has any, else the host's CPU plane
    (XLA:CPU's thunks).
    """
    from jax.profiler import ProfileData

    files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
    data = ProfileData.from_file(str(files[-1]))
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    planes = planes or [p for p in data.planes if p.name == "/host:CPU"]
    sources = op_sources(hlo_text)
    per_op: dict[str, float] = collections.defaultdict(float)
    unattributed = 0
    modules_seen: set[str] = set()
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                hlo_op, hlo_module = stats.get("hlo_op"), str(stats.get("hlo_module", ""))
                if hlo_op is None:
                    if plane.name.startswith("/device:") and event.duration_ns > 0:
                        unattributed += 1
                        per_op[event.name] += event.duration_ns
                    continue
                if hlo_module == module and not _CONTROL_FLOW.match(str(hlo_op)):
                    per_op[str(hlo_op)] += event.duration_ns
                modules_seen.add(hlo_module)
    if not per_op:
        raise ValueError(
            f"the trace in {trace_dir} has no events of {module} on {[p.name for p in planes]} "
            f"(modules seen: {sorted(modules_seen)})"
        )
    ops = [
        OpTime(name, part_of(sources.get(name, ""), name), sources.get(name, ""), ns / 1e6 / steps)
        for name, ns in per_op.items()
    ]
    ops.sort(key=lambda o: -o.ms_per_step)
    parts: dict[str, float] = collections.defaultdict(float)
    for op in ops:
        parts[op.part] += op.ms_per_step
    return Profile(
        plane=", ".join(p.name for p in planes),
        parts=dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        ops=ops,
        unattributed_events=unattributed,
    )
