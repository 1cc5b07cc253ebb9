"""Train-step benchmarks: configurations side by side on one GPU, or weak scaling over GPUs.

One GPU: dense DiT-XL vs ProMoE-XL per expert backend. One step = flow-matching forward (bf16
autocast) + RCL, backward, grad clip 0.5 and fused AdamW (the clip inside AdamW, as the trainer's ZeRO-0
step does: train.clip_in_adamw), EMA update (--fused-ema: AdamW and the EMA in one compiled pass, as
train.fused_ema; --bf16-weights: with it, the GEMM weights stored in bf16 and their float32 masters stepped by
that pass, as train.bf16_weights), on 256px latents (4x32x32) with synthetic data. Every configuration runs
in the same process on the same GPU, so the printed ratios compare like with like. Prints img/s, step ms,
peak GiB, MFU and the ratios to compiled dense and to the loop reference.

    python bench/train_step.py                       # the default table (batch 32 and 64)
    python bench/train_step.py --batch 64 --configs dense-compiled,grouped,loop --steps 20

Several GPUs (--gpus): for each N the real trainer (DeepSpeed ZeRO-2, expert parallel
ep_size = min(--ep, N)) runs under torchrun on N GPUs of this machine with a fixed per-GPU batch
(global batch = --batch x N), synthetic latents, no checkpoints, into --out-dir/<name>_n<N>_ep<E>_b<B>.
Its metrics.jsonl is averaged after the first logged window (warm-up, promoe_ds.scaling); prints
img/s, img/s per GPU, weak-scaling efficiency (per-GPU img/s / that of the fewest-GPU run) and MFU.
A launch that fails is a row of the table (its log: <run dir>/launch.log), not the end.

    python bench/train_step.py --gpus 1,2,4,8 --ep 2 --batch 32 --steps 30 \
        [--preset ProMoE-XL] [--set train.compile=true]
    python bench/train_step.py --gpus 1,2 --ep 2 --batch 4 --steps 6 --device cpu   # gloo, configs/tiny_cpu.yaml

--device cpu (the default without CUDA) runs the same launches as CPU processes (gloo, one thread each).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from promoe_ds.config import ObjectiveConfig, load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.ema import EMA
from promoe_ds.metrics import peak_flops, train_flops_per_image
from promoe_ds.models.dit import build_model, compile_model, count_params
from promoe_ds.optim import AdamWEMA, keep_bf16_weights
from promoe_ds.parallel.ep import global_grad_norm
from promoe_ds.scaling import ScalingError, add_ratios, markdown_table, summarize
from promoe_ds.train import clip_in_adamw, diffusion_losses

COMPILERS = {None: lambda m: m,   # eager
             "torch": torch.compile,  # plain torch.compile: the dense reference
             "trainer": compile_model}  # what train.compile=true uses (inductor's mix-order reduction off)
CONFIGS = {  # name: (preset, expert backend or None for dense, compiler)
    "dense": ("DiT-XL", None, None),
    "dense-compiled": ("DiT-XL", None, "torch"),
    "loop": ("ProMoE-XL", "loop", None),
    "grouped": ("ProMoE-XL", "grouped", None),
    "grouped-compiled": ("ProMoE-XL", "grouped", "trainer"),
    # plain torch.compile of ProMoE: on torch 2.11 its backward fails (pytorch#178080), the reason for "trainer"
    "grouped-compiled-torch": ("ProMoE-XL", "grouped", "torch"),
    "megablocks": ("ProMoE-XL", "megablocks", None),
}


def make_step(preset: str, backend: str | None, compiler: str | None, batch: int, fused_ema: bool = False,
              bf16_weights: bool = False):
    """(model cfg, step(i, mark=None)) for one full train step of ``preset`` on the GPU, rotating 4
    batches. ``mark(phase)``, when given, is called at the end of each phase: forward, backward,
    clip, optimizer, ema (bench/profile_step.py times them; with ``fused_ema`` the optimizer phase has the EMA).
    ``bf16_weights`` (needs ``fused_ema``): train.bf16_weights."""
    cfg = load_config(overrides=[f"model.preset={preset}"])
    dev = torch.device("cuda")
    model = build_model(cfg.model, seed=0).to(dev).train()
    if backend:
        model.set_expert_backend(backend, dev)
    fwd = COMPILERS[compiler](model)
    params = list(model.parameters())
    ema = EMA(model, 0.9999)
    if bf16_weights:
        keep_bf16_weights(model)
    hyper = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    opt = (AdamWEMA(params, ema.averages(), 0.9999, eps=1e-8, **hyper) if fused_ema else
           torch.optim.AdamW(params, **hyper, fused=True))
    ok = torch.ones((), device=dev)
    objective = build_objective(ObjectiveConfig())
    g = torch.Generator().manual_seed(0)
    shape = (4, 32, 32)
    batches = []
    for _ in range(4):  # rotate a few batches; labels include 10% null (CFG training)
        y = torch.randint(0, 1000, (batch,), generator=g)
        y[torch.rand(batch, generator=g) < 0.1] = 1000
        d = objective.draw(batch, shape, g)
        x0 = torch.randn(batch, *shape, generator=g)
        batches.append((x0.to(dev), y.to(dev), {k: v.to(dev) for k, v in d.items()}))

    def step(i, mark=lambda phase: None):
        x0, y, draws = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses, aux = diffusion_losses(objective, fwd, x0, y, draws)
            loss = losses["loss"] + aux["aux_loss"]
        mark("forward")
        loss.backward()
        mark("backward")
        clip_in_adamw(opt, global_grad_norm(params, 1), 0.5, ok)  # the norm now; the clip runs in opt.step()
        mark("clip")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        if not fused_ema:
            ema.update()
        mark("ema")

    return cfg, step


def bench(name: str, batch: int, steps: int, warmup: int, fused_ema: bool, bf16_weights: bool) -> dict:
    cfg, step = make_step(*CONFIGS[name], batch, fused_ema, bf16_weights)
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


SCALING_COLUMNS = ["gpus", "ep_size", "global_batch", "img_per_sec", "img_per_sec_per_gpu", "efficiency", "mfu",
                   "mem_peak_gib"]


def launch(n: int, args) -> dict:
    """The trainer on n devices of this machine (torchrun); its throughput from metrics.jsonl, or the error."""
    ep, b = min(args.ep, n), args.batch[0]
    out = Path(args.out_dir) / f"{args.preset or Path(args.config).stem}_n{n}_ep{ep}_b{b}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = [f"model.preset={args.preset}"] if args.preset else []
    overrides += ["data.source=synthetic", f"train.steps={args.steps}", f"train.global_batch={b * n}",
                  f"train.ep_size={ep}", f"train.out_dir={out}", f"train.log_every={max(1, args.steps // 6)}",
                  "train.ckpt_every=0", "train.resume=none", "wandb.mode=disabled", *args.set]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "promoe_ds.cli", "train", "--config", args.config, *overrides]
    env = dict(os.environ)
    if args.device == "cpu":  # CPU processes, one thread each (1 process = 1 "GPU"), gloo
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    print(f"$ {shlex.join(cmd)}", flush=True)
    row = {"gpus": n, "ep_size": ep, "global_batch": b * n, "path": str(out)}
    t = time.time()
    with open(out / "launch.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    row["wall_s"] = round(time.time() - t, 1)
    try:
        if rc:
            log = (out / "launch.log").read_text()  # ranks' lines may interleave
            why = (re.findall(r"^(error: .*?)(?=error:|$)", log, re.M)  # the trainer's one-line config error
                   or re.findall(r"^(\w*Error: .*)", log, re.M) or ["see launch.log"])  # else the last exception
            raise ScalingError(f"exit {rc}: {why[-1][:160]}")
        row.update(summarize(out))
    except ScalingError as e:
        row["error"] = str(e)
    print(json.dumps(row), flush=True)
    return row


def scaling(args) -> list[dict]:
    rows = [launch(n, args) for n in sorted(args.gpus)]
    add_ratios([r for r in rows if "error" not in r])  # efficiency vs the fewest-GPU run that worked
    print(f"\n{args.device}, per-GPU batch {args.batch[0]}, {args.steps} steps, config {args.config}"
          f"{', preset ' + args.preset if args.preset else ''} (first logged window skipped as warm-up)")
    print(markdown_table(rows, SCALING_COLUMNS))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 32 64); with --gpus: one, per GPU (32)")
    ap.add_argument("--configs", default="dense-compiled,grouped,grouped-compiled,megablocks,loop,dense")
    ap.add_argument("--steps", type=int, help="timed steps (default 15); with --gpus: training steps (30)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fused-ema", action="store_true", help="one GPU: AdamW and the EMA in one pass (optim.AdamWEMA)")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="one GPU, with --fused-ema: GEMM weights kept in bf16, float32 masters (train.bf16_weights)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")],
                    help="weak scaling over these GPU counts, e.g. 1,2,4,8")
    ap.add_argument("--ep", type=int, default=1, help="with --gpus: ep_size = min(EP, GPUs)")
    ap.add_argument("--preset", help="with --gpus: model.preset override (default: the config's)")
    ap.add_argument("--config", help="with --gpus: trainer config (default configs/promoe_xl.yaml; CPU: tiny_cpu.yaml)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="with --gpus: cpu = gloo CPU processes, one thread each (default without CUDA)")
    ap.add_argument("--out-dir", default="runs/bench", help="with --gpus: run directories go here")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="with --gpus: more trainer overrides, e.g. train.compile=true")
    args = ap.parse_args()
    if args.bf16_weights and not args.fused_ema:
        ap.error("--bf16-weights needs --fused-ema (its optimizer keeps the float32 masters)")
    if args.gpus:
        args.batch, args.steps = args.batch or [32], args.steps or 30
        args.config = args.config or ("configs/promoe_xl.yaml" if args.device == "cuda" else "configs/tiny_cpu.yaml")
        if len(args.batch) != 1:
            ap.error("--gpus takes one --batch (per GPU)")
        results = scaling(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    args.batch, args.steps = args.batch or [32, 64], args.steps or 15
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}"
          f"{'  AdamW + EMA in one pass (--fused-ema)' if args.fused_ema else ''}"
          f"{'  bf16 weights (--bf16-weights)' if args.bf16_weights else ''}", flush=True)
    results = []
    for b in args.batch:
        for name in args.configs.split(","):
            t = time.time()
            try:
                r = bench(name, b, args.steps, args.warmup, args.fused_ema, args.bf16_weights)
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
