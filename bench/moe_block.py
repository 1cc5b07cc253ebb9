"""Microbenchmark: one ProMoE-XL MoE block against one dense DiT-XL block, forward + backward, compiled as the
trainer compiles (``compile_model``), bf16 autocast, batch 64 at 256 px (16384 tokens, 10% null labels), on
one GPU. The step-level profile (bench/profile_step.py) sums kernels over 28 blocks, the optimizer and the
loss; this one lists every kernel of one block, so what the MoE layer adds to a block can be read kernel by
kernel (routing, RCL, gathers, weight casts, grouped GEMMs).

Variants: ``dense`` (DiT-XL block), ``promoe`` (ProMoE-XL MoE block with the RCL), ``promoe-no-rcl``
(model.moe.rcl_weight=0: the RCL's share).

    python bench/moe_block.py [--variants dense,promoe,promoe-no-rcl] [--iters 30] [--top 40] [--shapes]

``--shapes`` also lists each GEMM call (aten mm / addmm / bmm / grouped) with its input shapes and CUDA time.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from promoe_ds.config import load_config
from promoe_ds.models.dit import DiTBlock, compile_model
from promoe_ds.models.experts import resolve_backend
from promoe_ds.profiling import CATEGORIES, by_category

from timing import cuda_ms, kernels_ms  # bench/timing.py

VARIANTS = {"dense": ("DiT-XL", []), "promoe": ("ProMoE-XL", []),
            "promoe-no-rcl": ("ProMoE-XL", ["model.moe.rcl_weight=0"])}


def make_step(variant: str, batch: int):
    preset, extra = VARIANTS[variant]
    cfg = load_config(overrides=[f"model.preset={preset}", *extra]).model
    dev = torch.device("cuda")
    block = DiTBlock(cfg, moe=cfg.moe.router != "none", layer_seed=1).to(dev).train()
    if block.is_moe:
        backend = resolve_backend("auto", dev, (cfg.hidden_size, block.mlp.routed_experts.hidden))
        block.mlp.routed_experts.backend = block.mlp.uncond_experts.backend = backend
    with torch.no_grad():  # adaLN-Zero starts at zero: give the block's output a gradient everywhere
        block.adaLN_modulation[-1].weight.normal_(std=0.02)
    fwd = compile_model(block)
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    x = torch.randn(batch, tokens, cfg.hidden_size, device=dev, generator=g).requires_grad_()
    c = torch.randn(batch, cfg.hidden_size, device=dev, generator=g).requires_grad_()
    cond = torch.rand(batch, device=dev, generator=g) >= 0.1  # ~10% null labels (CFG dropout)
    params = list(block.parameters())

    def step():
        for t in (x, c, *params):
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            out, aux = fwd(x, c, cond)
            loss = out.float().square().mean() + (aux["aux_loss"] if aux else 0.0)
        loss.backward()

    return step


def gemm_shapes(step) -> None:
    """The block's GEMM calls by input shapes, CUDA ms per block (inductor's extern GEMMs are aten calls)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    gemms = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm")
    rows = [(evt.device_time_total / 5e3, evt.key, evt.input_shapes)
            for evt in prof.key_averages(group_by_input_shape=True) if evt.key in gemms]
    for ms, key, shapes in sorted(rows, key=lambda r: -r[0]):
        print(f"  {ms:7.3f} ms  {key} {shapes}")


def run(variant: str, batch: int, iters: int, top: int, shapes: bool) -> dict[str, float]:
    step = make_step(variant, batch)
    ms = cuda_ms(step, iters, warmup=5)
    kernels = kernels_ms(step, 5)
    print(f"\n{variant}: {ms:.3f} ms per block (fwd+bwd), kernels {sum(kernels.values()):.3f} ms", flush=True)
    for name, k in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {k:7.3f} ms  {name[:160]}")
    if shapes:
        gemm_shapes(step)
    torch._dynamo.reset()
    return by_category(kernels) | {"step (events)": ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--shapes", action="store_true", help="also the GEMM calls with their input shapes")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}")
    cols = {v: run(v, args.batch, args.iters, args.top, args.shapes) for v in args.variants.split(",")}
    rows = ["step (events)"] + [name for name, _ in CATEGORIES]
    print("\n| ms per block | " + " | ".join(cols) + " |\n|---" * 1 + "|---" * len(cols) + "|")
    for r in rows:
        print(f"| {r} | " + " | ".join(f"{c.get(r, 0.0):.3f}" for c in cols.values()) + " |")


if __name__ == "__main__":
    main()
