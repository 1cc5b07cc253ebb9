"""Full train-step benchmark on one GPU: dense DiT-XL vs ProMoE-XL per expert backend.

One step = flow-matching forward (bf16 autocast) + RCL, backward, grad clip 0.5, fused AdamW,
EMA update, on 256px latents (4x32x32) with synthetic data. Every configuration runs in the same
process on the same GPU, so the printed ratios compare like with like.

    python bench/train_step.py                       # the issue-7 table (batch 32 and 64)
    python bench/train_step.py --batch 64 --configs dense-compiled,grouped,loop --steps 20

Prints img/s, step ms, peak GiB, MFU and the ratios to compiled dense and to the loop reference.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from promoe_ds.config import ObjectiveConfig, load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.ema import EMA
from promoe_ds.metrics import peak_flops, train_flops_per_image
from promoe_ds.models.dit import build_model, count_params

CONFIGS = {  # name: (preset, expert backend or None for dense, torch.compile)
    "dense": ("DiT-XL", None, False),
    "dense-compiled": ("DiT-XL", None, True),
    "loop": ("ProMoE-XL", "loop", False),
    "grouped": ("ProMoE-XL", "grouped", False),
    "grouped-compiled": ("ProMoE-XL", "grouped", True),
    "megablocks": ("ProMoE-XL", "megablocks", False),
}


def make_step(preset: str, backend: str | None, compiled: bool, batch: int):
    """(model cfg, step(i)) for one full train step of ``preset`` on the GPU, rotating 4 batches."""
    cfg = load_config(overrides=[f"model.preset={preset}"])
    dev = torch.device("cuda")
    model = build_model(cfg.model, seed=0).to(dev).train()
    if backend:
        model.set_expert_backend(backend)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    ema = EMA(model, 0.9999)
    objective = build_objective(ObjectiveConfig())
    g = torch.Generator().manual_seed(0)
    shape = (4, 32, 32)
    batches = []
    for _ in range(4):  # rotate a few batches; labels include 10% null (CFG training)
        y = torch.randint(0, 1000, (batch,), generator=g)
        y[torch.rand(batch, generator=g) < 0.1] = 1000
        d = objective.draw(batch, shape, g)
        batches.append((torch.randn(batch, *shape, generator=g).to(dev), y.to(dev), {k: v.to(dev) for k, v in d.items()}))

    def step(i):
        x0, y, draws = batches[i % len(batches)]
        aux = {}

        def model_fn(xt, t):
            out, a = fwd(xt, t, y)
            aux.update(a)
            return out

        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.training_losses(model_fn, x0, draws)["loss"] + aux["aux_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()

    return cfg, step


def bench(name: str, batch: int, steps: int, warmup: int) -> dict:
    cfg, step = make_step(*CONFIGS[name], batch)
    dev = torch.device("cuda")
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        step(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    ips = batch / ms * 1e3
    flops = train_flops_per_image(cfg.model, count_params(cfg.model)["activated_params"])
    peak = peak_flops(dev)
    res = {"config": name, "batch": batch, "img_per_sec": ips, "step_ms": ms,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "mfu": ips * flops / peak if peak else None}
    del step
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--configs", default="dense-compiled,grouped,grouped-compiled,megablocks,loop,dense")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    results = []
    for b in args.batch:
        for name in args.configs.split(","):
            t = time.time()
            try:
                r = bench(name, b, args.steps, args.warmup)
            except Exception as e:  # a backend missing on this machine is reported, not fatal
                r = {"config": name, "batch": b, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            r["wall_s"] = round(time.time() - t, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| config | batch | img/s | step ms | peak GiB | MFU | vs dense-compiled | vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['batch']} | error: {r['error'][:80]} |")
            continue
        ref = {x["config"]: x for x in results if x["batch"] == r["batch"] and "error" not in x}
        dense = ref.get("dense-compiled", {}).get("img_per_sec")
        loop = ref.get("loop", {}).get("img_per_sec")
        print(f"| {r['config']} | {r['batch']} | {r['img_per_sec']:.1f} | {r['step_ms']:.1f} | {r['peak_gib']:.1f} | "
              f"{(r['mfu'] or 0):.1%} | {r['img_per_sec'] / dense if dense else float('nan'):.2f} | "
              f"{r['img_per_sec'] / loop if loop else float('nan'):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
