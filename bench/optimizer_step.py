"""Microbenchmark: the optimizer part of the train step over ProMoE-XL's (or DiT-XL's) real parameter
shapes, fp32 on one GPU. Compares gradient clipping as its own pass (clip_grad_norm_) against clipping
inside torch's fused AdamW (``grad_scale``), with and without the non-finite skip (``found_inf``); and the
trainer's AdamW + EMA (fused AdamW, then the EMA's own pass) against both in one compiled pass
(``promoe_ds.optim.adamw_ema_``, ``train.fused_ema``), and that pass from bf16 gradients writing bf16 weights
(``train.bf16_weights``).

    python bench/optimizer_step.py [--preset ProMoE-XL] [--iters 20] [--only "one pass"]
"""
from __future__ import annotations

import argparse
import functools

import torch

from promoe_ds.config import load_config
from promoe_ds.models.dit import DiT
from promoe_ds.optim import adamw_ema_

from timing import cuda_ms  # bench/timing.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ProMoE-XL")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", default="", help="the variants whose name contains this")
    args = ap.parse_args()
    cfg = load_config(overrides=[f"model.preset={args.preset}"])
    with torch.device("meta"):
        shapes = [p.shape for p in DiT(cfg.model).parameters()]
    dev = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
    grads = [torch.randn(s, device=dev) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    zero = torch.zeros((), device=dev)
    emas = [p.detach().clone() for p in params]
    moments = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    count, lr = torch.zeros((), device=dev), torch.full((), 1e-4, device=dev)
    one_pass = torch.compile(adamw_ema_)

    bf16_params, bf16_grads = [p.detach().bfloat16() for p in params], [g.bfloat16() for g in grads]

    def norm(gs=grads):
        return torch.stack(torch._foreach_norm(gs, 2, dtype=torch.float32)).square().sum().sqrt()

    def step(clip_pass: bool, scale: bool, skip: bool):
        """clip_pass: clip_grad_norm_'s way (norm, one multiply pass); scale: the clip as AdamW's grad_scale;
        skip: AdamW's found_inf input (both: train.clip_in_adamw)."""
        n = norm() if clip_pass or scale else None
        if clip_pass:
            torch._foreach_mul_(grads, torch.clamp(0.5 / (n + 1e-6), max=1.0))
        opt.grad_scale = torch.clamp(n / 0.5, min=1.0) if scale else None
        opt.found_inf = zero if skip else None
        opt.step()

    def step_ema(fused: bool, bf16: bool = False):
        """The trainer's optimizer part: norm, AdamW(grad_scale), EMA; fused: the last two in one pass; bf16:
        that pass from bf16 gradients, writing bf16 copies of the weights (every tensor here)."""
        gs = bf16_grads if bf16 else grads
        scale = torch.clamp(norm(gs) / 0.5, min=1.0)
        if fused:
            count.add_(1)
            one_pass(params, gs, *moments, emas, count, lr, scale, bf16_params if bf16 else None, beta1=0.9,
                     beta2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999)
        else:
            opt.grad_scale, opt.found_inf = scale, zero
            opt.step()
            torch._foreach_lerp_(emas, params, 1e-4)

    for p, g in zip(params, grads):
        p.grad = g
    n = sum(p.numel() for p in params)
    print(f"{args.preset}: {len(params)} tensors, {n / 1e6:.0f}M parameters", flush=True)
    variants = {"adamw only": (step, False, False, False), "clip pass + adamw": (step, True, False, False),
                "adamw(grad_scale)": (step, False, True, False),
                "clip pass + adamw(found_inf)": (step, True, False, True),
                "adamw(grad_scale, found_inf)": (step, False, True, True),
                "norm, adamw(grad_scale), ema": (step_ema, False),
                "norm, one pass adamw+ema": (step_ema, True),
                "norm, one pass, bf16 grads and weights": (step_ema, True, True)}
    variants = {k: v for k, v in variants.items() if args.only in k}
    for name, (fn, *flags) in list(variants.items()) * 2:
        print(f"{name:36s} {cuda_ms(functools.partial(fn, *flags), args.iters, warmup=3):7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
