"""Sampling throughput on one GPU: ProMoE-XL (random weights), bf16 autocast, 250 Euler steps, CFG 1.5.

    .venv/bin/python -m bench.sample_speed                        # the issue-5 number
    .venv/bin/python -m bench.sample_speed --batch-size 128 --cfg-scale 1.0 --model DiT-XL

Times ``promoe_ds.sample.generate``, the code path of ``promoe-ds sample``: per-sample seeded noise,
one doubled-batch forward per step with labels [y, null] (the null half goes to the unconditional
expert, Appendix B), the expert backend ``auto`` picks on CUDA (torch grouped GEMM). Latents only:
VAE decoding and PNG writing are excluded (they are not part of the model's sampling cost). A
warm-up batch of a few steps runs first. Prints img/s. About a minute on an H100, most of it
building the random 1.6B-parameter model on the CPU.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from promoe_ds.config import load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.models.dit import build_model
from promoe_ds.sample import class_labels, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ProMoE-XL", help="preset")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (x2 forward rows with CFG)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--backend", default="auto", help="expert backend: auto | grouped | megablocks | loop")
    p.add_argument("--batches", type=int, default=1, help="timed batches")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = load_config(None, [f"model.preset={args.model}"])
    t0 = time.time()
    model = build_model(cfg.model, seed=0)
    model.set_expert_backend(args.backend, dev)
    model = model.to(dev).eval()
    built = time.time() - t0
    objective = build_objective(cfg.objective)
    bs = args.batch_size

    def run(first: int, steps: int) -> float:
        idx = list(range(first, first + bs))
        labels = class_labels(idx, None, cfg.model.num_classes, seed=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        z = generate(model, objective, idx, labels, steps=steps, cfg_scale=args.cfg_scale, seed=0, bf16=True)
        torch.cuda.synchronize()
        assert torch.isfinite(z).all()
        return time.perf_counter() - t

    run(0, 5)  # warm-up: kernels, allocator
    torch.cuda.reset_peak_memory_stats()
    seconds = sum(run(bs * (b + 1), args.steps) for b in range(args.batches))
    images = bs * args.batches
    result = {"model": args.model, "gpu": torch.cuda.get_device_name(dev), "batch_size": bs, "steps": args.steps,
              "cfg_scale": args.cfg_scale, "backend": model.moe_layers()[0].routed_experts.backend if model.moe_layers()
              else "dense", "precision": "bf16 autocast", "img_per_s": images / seconds,
              "s_per_step": seconds / (args.steps * args.batches), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "build_s": built, "decode": "excluded (latents only)"}
    print(json.dumps(result))
    print(f"{args.model} {result['gpu']}: {result['img_per_s']:.2f} img/s ({args.steps} Euler steps, CFG "
          f"{args.cfg_scale:g}, batch {bs}, bf16, {result['backend']} experts; latents only, VAE decoding excluded)")


if __name__ == "__main__":
    main()
