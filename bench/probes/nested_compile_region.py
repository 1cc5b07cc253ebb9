"""Experiment probe, not part of promoe-ds: the whole-model compile (``compile_model``) against the same compile
with every block marked ``torch.compiler.nested_compile_region`` (each kind of block compiled once, then reused):
time of the first compiled step, and the gradients of both against eager, under bf16 autocast with grouped experts.

    python bench/probes/nested_compile_region.py --depth 8 [--nested] [--device cuda]

Run it once without and once with ``--nested`` (dynamo state is per process). torch 2.13 on the CPU, depth 8:
134 s / 75 s for the first step, largest relative gradient error against eager 0.011 / 1.003: not used.
"""
from __future__ import annotations

import argparse
import time

import torch

from promoe_ds.config import load_config
from promoe_ds.models.dit import DiTBlock, build_model, compile_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--nested", action="store_true", help="mark DiTBlock.forward as a nested compile region")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = load_config("configs/tiny_cpu.yaml", [f"model.depth={args.depth}"]).model
    model = build_model(cfg).train().to(dev)
    with torch.no_grad():  # open adaLN-Zero gates so every weight gets a gradient
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.02)
        model.final_layer.linear.weight.normal_(std=0.02)
    model.set_expert_backend("grouped", dev)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g).to(dev), (torch.rand(4, generator=g) * 1000).to(dev)
    y = torch.tensor([1, 10, 3, 4], device=dev)

    def step(fwd):
        model.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out, aux = fwd(x, t, y)
            loss = out.float().square().mean() + aux["aux_loss"]
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = step(model)
    if args.nested:
        DiTBlock.forward = torch.compiler.nested_compile_region(DiTBlock.forward)
    start = time.perf_counter()
    compiled = step(compile_model(model))
    errs = {n: float((compiled[n] - e).norm() / e.norm().clamp(min=1e-12)) for n, e in eager.items()}
    worst = max(errs, key=errs.get)
    print(f"{'nested regions' if args.nested else 'whole model'}, depth {args.depth}: first compiled step "
          f"{time.perf_counter() - start:.1f} s; largest relative gradient error against eager {errs[worst]:.3f} "
          f"({worst}); {sum(e > 0.05 for e in errs.values())} of {len(errs)} above 0.05")


if __name__ == "__main__":
    main()
