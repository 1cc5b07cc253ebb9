"""Timing helpers shared by the GPU microbenchmarks (bench/grouped_gemm.py, bench/moe_block.py,
bench/optimizer_step.py, bench/profile_step.py)."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from promoe_ds.profiling import kernel_ms


def cuda_ms(step, iters: int, warmup: int) -> float:
    """Mean ms per ``step()`` between two CUDA events, after ``warmup`` calls (compilation, autotuning)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        step()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def kernels_ms(step, steps: int) -> dict[str, float]:
    """CUDA kernel time per kernel name, ms per ``step()``, from one profiled run of ``steps`` calls."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return kernel_ms(prof, steps)
