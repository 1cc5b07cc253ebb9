"""Profile one ProMoE-XL train step on the GPU (torch.profiler): top CUDA kernels and CPU ops.

    python bench/profile_step.py [--backend grouped] [--batch 64] [--compile]
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from train_step import make_step  # noqa: E402  (the same step the benchmark times)

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="grouped")
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--preset", default="ProMoE-XL")
ap.add_argument("--compile", action="store_true")
args = ap.parse_args()
_, step = make_step(args.preset, args.backend, "trainer" if args.compile else None, args.batch)
for i in range(3):
    step(i)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for i in range(2):
        step(i)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
