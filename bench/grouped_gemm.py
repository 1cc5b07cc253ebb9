"""Microbenchmark: the expert MLPs of one ProMoE-XL MoE layer (12 routed + 1 unconditional expert of width
2D, batch 64 at 256 px = 16384 tokens), forward + backward under bf16 autocast, on one GPU:

- ``dense``: one MLP of the same width over all tokens (the FLOPs of the grouped GEMMs, cuBLAS), compiled;
- ``grouped-eager`` / ``grouped-compiled``: the trainer's ``grouped`` backend (``torch._grouped_mm``, ATen's
  CUTLASS kernel), eager and under the default torch.compile;
- ``grouped-autotune``: the same, compiled with inductor's ``max_autotune_gemm``, which also times its Triton
  grouped-GEMM template against the ATen kernel and keeps the faster one per GEMM;
- ``grouped-nobias``: the grouped GEMMs without the bias columns (K = D and H exactly, biases left out),
  compiled: the floor for any way of adding the biases outside the GEMMs.

Prints ms per layer, TFLOP/s of the GEMMs, and the top CUDA kernels of each variant.

    python bench/grouped_gemm.py [--tokens 16384] [--iters 50] [--variants dense,grouped-compiled,...]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from promoe_ds.models.experts import grouped_experts

from timing import cuda_ms, kernels_ms  # bench/timing.py

VARIANTS = ("dense", "grouped-eager", "grouped-compiled", "grouped-autotune", "grouped-nobias")


def token_counts(tokens: int, routed: int, seed: int = 0) -> torch.Tensor:
    """~10% null-label tokens to the unconditional expert (CFG dropout), the rest over the routed experts
    with a moderate imbalance (Dirichlet(5) shares, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    uncond = tokens // 10
    share = torch._standard_gamma(torch.full((routed,), 5.0), generator=g)
    counts = torch.multinomial(share / share.sum(), tokens - uncond, replacement=True, generator=g)
    return torch.cat([torch.bincount(counts, minlength=routed), torch.tensor([uncond])])


def make_fn(variant: str):
    if variant == "dense":
        def fn(x, w1, b1, w2, b2):
            return F.linear(F.gelu(F.linear(x, w1[0], b1[0]), approximate="tanh"), w2[0], b2[0])
        return torch.compile(fn)
    if variant == "grouped-eager":
        return grouped_experts
    if variant == "grouped-nobias":
        def nobias(x, counts, w1, b1, w2, b2):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            x, w1, w2 = x.bfloat16(), w1.bfloat16(), w2.bfloat16()
            h = F.gelu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs), approximate="tanh")
            return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        return torch.compile(nobias)
    opts = {"max_autotune_gemm": True} if variant == "grouped-autotune" else None
    return torch.compile(grouped_experts, options=opts)


def run(variant: str, counts: torch.Tensor, dim: int, hidden: int, iters: int, top: int) -> float:
    dev = torch.device("cuda")
    n, e = int(counts.sum()), counts.numel()
    e = 1 if variant == "dense" else e
    g = torch.Generator(device=dev).manual_seed(0)
    params = [torch.randn(s, device=dev, generator=g).mul_(0.02).requires_grad_()
              for s in ((e, hidden, dim), (e, hidden), (e, dim, hidden), (e, dim))]
    x = torch.randn(n, dim, device=dev, generator=g).requires_grad_()
    fn = make_fn(variant)
    args = (x,) if variant == "dense" else (x, counts.to(dev))

    def step():
        for t in (x, *params):
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(*args, *params)
        y.float().square().mean().backward()

    ms = cuda_ms(step, iters, warmup=3)
    flops = 3 * 2 * 2 * n * dim * hidden  # two GEMMs, forward + two backward GEMMs each
    print(f"{variant:>18}: {ms:7.3f} ms per layer (fwd+bwd), GEMM FLOPs at {flops / ms / 1e9:6.1f} TFLOP/s")
    for k, t in sorted(kernels_ms(step, 5).items(), key=lambda kv: -kv[1])[:top]:
        print(f"{'':>20}{t:7.3f} ms  {k[:150]}")
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--routed", type=int, default=12)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    counts = token_counts(args.tokens, args.routed)
    print(f"tokens per expert (last: unconditional): {counts.tolist()}")
    print(torch.cuda.get_device_name(), torch.__version__)
    times = {v: run(v, counts, args.dim, args.hidden, args.iters, args.top) for v in args.variants.split(",")}
    if "dense" in times:
        print("vs dense: " + ", ".join(f"{v} {times['dense'] / t:.2f}x" for v, t in times.items()))


if __name__ == "__main__":
    main()
