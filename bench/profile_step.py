"""Profile one ProMoE-XL train step on the GPU (torch.profiler): top CUDA kernels and CPU ops.

    python bench/profile_step.py [--backend grouped] [--batch 64] [--compile]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from promoe_ds.config import ObjectiveConfig, load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.models.dit import build_model

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="grouped")
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--preset", default="ProMoE-XL")
args = ap.parse_args()
cfg = load_config(overrides=[f"model.preset={args.preset}"])
model = build_model(cfg.model).cuda().train()
model.set_expert_backend(args.backend)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
obj = build_objective(ObjectiveConfig())
g = torch.Generator().manual_seed(0)
x0 = torch.randn(args.batch, 4, 32, 32).cuda()
y = torch.randint(0, 1001, (args.batch,)).cuda()
draws = {k: v.cuda() for k, v in obj.draw(args.batch, (4, 32, 32), g).items()}


def step():
    aux = {}

    def fn(xt, t):
        out, a = model(xt, t, y)
        aux.update(a)
        return out

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = obj.training_losses(fn, x0, draws)["loss"] + aux["aux_loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
