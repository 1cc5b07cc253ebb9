"""Microbenchmark: the optimizer part of the train step over ProMoE-XL's (or DiT-XL's) real parameter
shapes, fp32 on one GPU. Compares gradient clipping as its own pass (clip_grad_norm_) against clipping
inside torch's fused AdamW (``grad_scale``), with and without the non-finite skip (``found_inf``).

    python bench/optimizer_step.py [--preset ProMoE-XL] [--iters 20]
"""
from __future__ import annotations

import argparse

import torch

from promoe_ds.config import load_config
from promoe_ds.models.dit import DiT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ProMoE-XL")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cfg = load_config(overrides=[f"model.preset={args.preset}"])
    with torch.device("meta"):
        shapes = [p.shape for p in DiT(cfg.model).parameters()]
    dev = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
    grads = [torch.randn(s, device=dev) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    zero = torch.zeros((), device=dev)

    def norm():
        return torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()

    def separate():  # clip_grad_norm_'s way: norm, one multiply pass, then AdamW
        coef = torch.clamp(0.5 / (norm() + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        opt.step()

    def scale_only():
        opt.grad_scale, opt.found_inf = torch.clamp(norm() / 0.5, min=1.0), None
        opt.step()

    def skip_only():
        coef = torch.clamp(0.5 / (norm() + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        opt.grad_scale, opt.found_inf = None, zero
        opt.step()

    def scale_and_skip():  # train.clip_in_adamw
        opt.grad_scale, opt.found_inf = torch.clamp(norm() / 0.5, min=1.0), zero
        opt.step()

    def adamw_only():
        opt.grad_scale, opt.found_inf = None, None
        opt.step()

    for p, g in zip(params, grads):
        p.grad = g
    n = sum(p.numel() for p in params)
    print(f"{args.preset}: {len(params)} tensors, {n / 1e6:.0f}M parameters")
    for name, fn in [("adamw only", adamw_only), ("clip pass + adamw", separate), ("adamw(grad_scale)", scale_only),
                     ("clip pass + adamw(found_inf)", skip_only), ("adamw(grad_scale, found_inf)", scale_and_skip)] * 2:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(args.iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        print(f"{name:32s} {a.elapsed_time(b) / args.iters:7.2f} ms")


if __name__ == "__main__":
    main()
