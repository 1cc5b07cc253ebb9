"""Where a training step's time goes: torch.profiler over a few steps of a real run.

``train.profile_at=N`` (with ``train.profile_steps``, default 3) profiles steps N, N+1, ... of the
trainer and writes, per rank, into ``<out_dir>/profile/``:

- ``rank<r>.trace.json.gz``: the trace (open it in https://ui.perfetto.dev or chrome://tracing);
- ``rank<r>.txt``: ms per step of wall time and of device kernels (how busy the GPU was); for each
  phase of the step (data, forward, backward, optimizer, EMA, bookkeeping) its host time and how long
  the GPU sat idle during it (where a host-bound step loses its time); the kernels summed by
  category, the top kernels and the top host operations.

``train.profile_python=true`` also records Python call stacks (which DeepSpeed or promoe-ds
function the host time goes to, in the trace), at the price of a slower host while profiling.

The kernel categories are shared with ``bench/profile_step.py``.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from promoe_ds.parallel import watchdog

# the trainer's step phases, as torch.profiler.record_function ranges
PHASES = ("data", "forward", "backward", "optimizer", "ema", "bookkeeping")
# first match wins; inductor's kernels are named triton_*, whatever ops they fuse
CATEGORIES = [
    ("optimizer, EMA, clip (multi-tensor)", r"multi_tensor_apply|FusedOptimizer|LpNorm"),
    ("inductor fused (triton)", r"^triton_"),
    ("attention", r"sdpa|flash|fmha|dot_do_o|convert_dq|attention"),  # before GEMMs: cuDNN names hold "wgmma"
    ("grouped GEMM (experts)", r"GroupProblemShape|GemmGrouped|grouped_gemm"),
    ("GEMM", r"nvjet|gemm|cutlass|xmma|cublas"),
    ("NCCL", r"nccl"),
    ("memcpy / memset", r"Memcpy|Memset"),
    ("other", r""),
]


def category(kernel: str) -> str:
    return next(name for name, rx in CATEGORIES if re.search(rx, kernel))


def kernel_ms(prof: profile, steps: int) -> dict[str, float]:
    """Device kernel time per kernel name, ms per step (user annotations excluded)."""
    out = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA and not evt.is_user_annotation:
            out[evt.name] += evt.device_time_total / 1e3 / steps
    return dict(out)


def by_category(per_kernel: dict[str, float]) -> dict[str, float]:
    out = defaultdict(float)
    for name, ms in per_kernel.items():
        out[category(name)] += ms
    return dict(out)


def merge_spans(spans) -> list[tuple[float, float]]:
    """Union of (start, end) intervals, as sorted disjoint intervals."""
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def covered(merged: list[tuple[float, float]], a: float, b: float) -> float:
    """How much of [a, b] the disjoint intervals ``merged`` cover."""
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged if y > a and x < b)


def phase_ms(prof: profile, steps: int) -> dict[str, tuple[float, float]]:
    """Per phase of PHASES: (host ms, device-idle ms) per step. Host: the phase's record_function ranges
    on the host. Device idle: the part of those ranges in which no kernel ran, i.e. the GPU waited for
    the host while it was in that phase (the phase to make cheaper on the host when a step is
    host-bound). The profiler puts kernels on the host's clock."""
    busy = merge_spans((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    host, idle = defaultdict(float), defaultdict(float)
    for evt in prof.events():
        if evt.name in PHASES and evt.device_type == DeviceType.CPU:
            a, b = evt.time_range.start, evt.time_range.end
            host[evt.name] += (b - a) / 1e3 / steps
            idle[evt.name] += (b - a - covered(busy, a, b)) / 1e3 / steps
    return {p: (host[p], idle[p]) for p in PHASES if p in host}


def top_host_ops(prof: profile, n: int) -> list[tuple[str, float]]:
    """The host operations with the most self CPU time, ms per profile window."""
    avgs = [e for e in prof.key_averages() if e.key not in PHASES]
    avgs.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3) for e in avgs[:n]]


def top_python(prof: profile, steps: int, n: int) -> list[tuple[str, float]]:
    """DeepSpeed's and promoe-ds's Python functions by inclusive host time, ms per step (with_stack)."""
    out = defaultdict(float)
    for e in prof.events():
        if re.match(r"(.*/)?(deepspeed|promoe_ds)/.*\.py\(\d+\): ", e.name):
            out[e.name] += e.time_range.elapsed_us() / 1e3 / steps
    return sorted(out.items(), key=lambda kv: -kv[1])[:n]


class StepProfiler:
    """Profiles steps ``first`` .. ``first + steps - 1`` (1-based, as logged) of the training loop:
    ``begin(step)`` before a step, ``end(step)`` after it; writes the report when the window ends."""

    def __init__(self, out_dir: Path, rank: int, first: int, steps: int, device: torch.device, python: bool):
        self.dir, self.rank, self.first, self.steps, self.device = out_dir / "profile", rank, first, steps, device
        self.python = python
        self.prof = None
        self.t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        if step != self.first:
            return
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=acts, with_stack=self.python)
        self._sync()
        self.prof.start()
        self.t0 = time.perf_counter()

    def end(self, step: int, last: bool) -> None:
        """After ``step``; ``last``: the run stops after it (the window may be cut short)."""
        if self.prof is None or (step < self.first + self.steps - 1 and not last):
            return
        self._sync()
        self.steps = step - self.first + 1
        wall = (time.perf_counter() - self.t0) * 1e3 / self.steps
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json.gz"))
        (self.dir / f"rank{self.rank}.txt").write_text(self.report(wall))
        if self.rank == 0:
            print(f"profile of steps {self.first}-{step}: {self.dir}/rank0.txt (trace: rank0.trace.json.gz)",
                  flush=True)
        self.prof = None

    def report(self, wall: float) -> str:
        kernels = kernel_ms(self.prof, self.steps)
        busy = sum(kernels.values())
        lines = [f"steps {self.first}-{self.first + self.steps - 1} on {self.device}: wall {wall:.1f} ms/step"]
        phases = phase_ms(self.prof, self.steps)
        if not kernels:  # CPU run: host times only
            lines += ["", "| phase | host ms/step |", "|---|---|"]
            lines += [f"| {p} | {h:.1f} |" for p, (h, _) in phases.items()]
        else:
            lines += [f"device kernels {busy:.1f} ms/step ({busy / wall:.0%} of the wall time)", "",
                      "| phase | host ms/step | GPU idle in it, ms/step |", "|---|---|---|"]
            lines += [f"| {p} | {h:.1f} | {i:.1f} |" for p, (h, i) in phases.items()]
            lines += ["", "| kernel category | ms/step |", "|---|---|"]
            lines += [f"| {c} | {ms:.1f} |" for c, ms in sorted(by_category(kernels).items(), key=lambda kv: -kv[1])]
            lines += ["", "top kernels (ms/step):"]
            lines += [f"  {ms:8.2f}  {k[:160]}" for k, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:30]]
        lines += ["", f"top host operations (self CPU ms over the {self.steps} steps):"]
        lines += [f"  {ms:8.2f}  {k[:160]}" for k, ms in top_host_ops(self.prof, 30)]
        if self.python:
            lines += ["", "DeepSpeed and promoe-ds functions by inclusive host time (ms/step):"]
            lines += [f"  {ms:8.2f}  {k[:160]}" for k, ms in top_python(self.prof, self.steps, 40)]
        return "\n".join(lines) + "\n"


def phase(name: str) -> record_function:
    """``with phase("forward"):`` marks a step phase for the profiler (near free when none runs) and for the
    hang watchdog (what a rank stuck in it waits for)."""
    assert name in PHASES, name
    watchdog.mark(name)
    return record_function(name)
