"""Sampling throughput on one GPU, eager vs torch.compile in one run: ProMoE-XL and DiT-XL (random weights),
bf16 autocast, 250 Euler steps, CFG 1.5, batch 64, latents only; optionally the authors' procedure.

    .venv/bin/python -m bench.sample_speed                          # ProMoE-XL and DiT-XL, eager and compiled
    .venv/bin/python -m bench.sample_speed --authors-steps 25       # + ali-vilab/ProMoE's sampler (fp32, 2 passes)
    .venv/bin/python -m bench.sample_speed --device cpu --models ProMoE-S --set model.depth=4 model.input_size=16 \
        --batch-size 4 --steps 100 --no-compile                     # the bf16 / fp32 comparison on a CPU

Times ``promoe_ds.sample.generate``, the code path of ``promoe-ds sample``: per-sample seeded noise, one
doubled-batch forward per step with labels [y, null] (the null half goes to the unconditional expert,
Appendix B), the expert backend ``auto`` picks (torch grouped GEMM on CUDA); first eagerly, then with the
model under ``torch.compile`` as ``promoe-ds sample`` runs it on CUDA (static shapes; the compilation is
timed separately, in a warm-up batch of a few steps). Latents only: VAE decoding and PNG writing are
excluded. ``--authors-steps K`` also times the authors' sampler (tests/authors_reference.py: diffusers'
scheduler, fp32, a conditional and an unconditional pass per step) over K steps, reported as img/s at
``--steps`` (the time per step is constant).

``--check N``: the first N images of the timed batch are sampled again in float32 by promoe-ds and by the
authors' procedure from the same noise and labels, and the relative L2 differences of the latents are
printed: promoe-ds fp32 vs the authors' (float32 rounding: the doubled batch equals two passes),
bf16 eager and bf16 compiled vs the authors' (the effect of bf16), compiled vs eager. Random weights with
the zero-initialised layers (adaLN-Zero, output) drawn from N(0, 0.02^2), so the velocity is not zero.

One JSON line per model and a summary line with the compiled / eager ratio. Building the random
1.6B-parameter ProMoE-XL on the CPU takes most of a minute; the compilation another one or two.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from promoe_ds.config import load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.models.dit import build_model, compile_model
from promoe_ds.sample import class_labels, generate, initial_noise

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from authors_reference import authors_flow_sampler  # noqa: E402  (the reference of tests/test_sample.py)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_model(preset: str, overrides: list[str], backend: str, device: torch.device):
    cfg = load_config(None, [f"model.preset={preset}", *overrides])
    model = build_model(cfg.model, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # adaLN-Zero and output layers: a non-zero velocity
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.set_expert_backend(backend, device)
    return cfg, model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(preset: str, args, device: torch.device) -> dict:
    t0 = time.time()
    cfg, model = random_model(preset, args.set, args.backend, device)
    objective = build_objective(cfg.objective)
    res = {"model": preset, "overrides": args.set,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "batch_size": args.batch_size, "steps": args.steps, "cfg_scale": args.cfg_scale,
           "backend": model.moe_layers()[0].routed_experts.backend if model.moe_layers() else "dense",
           "precision": "bf16 autocast" if args.bf16 else "fp32", "build_s": time.time() - t0}
    idx = list(range(args.batch_size))
    labels = class_labels(idx, None, cfg.model.num_classes, seed=0)

    def run(forward, steps: int, bf16: bool = args.bf16) -> tuple[torch.Tensor, float]:
        sync(device)
        t = time.perf_counter()
        z = generate(forward, objective, idx, labels, steps=steps, cfg_scale=args.cfg_scale, seed=0, bf16=bf16)
        sync(device)
        assert torch.isfinite(z).all()
        return z, time.perf_counter() - t

    run(model, 5)  # warm-up: kernels, allocator
    z_eager, dt = run(model, args.steps)
    res["eager_img_per_s"] = args.batch_size / dt
    z = {"eager": z_eager}
    if args.compile:
        torch._dynamo.reset()
        compiled = compile_model(model, dynamic=False)
        res["compile_s"] = run(compiled, 5)[1]  # the compilation, in a 5-step warm-up batch
        z["compiled"], dt = run(compiled, args.steps)
        res["compiled_img_per_s"] = args.batch_size / dt
        res["compiled_over_eager"] = res["compiled_img_per_s"] / res["eager_img_per_s"]
        res["rel_compiled_vs_eager"] = rel(z["compiled"], z["eager"])
    if args.authors_steps:
        noise = initial_noise(cfg.model, idx, 0).to(device)
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            authors_flow_sampler(model, noise, labels.to(device), args.authors_steps, args.cfg_scale, objective.shift)
        sync(device)
        res["authors_fp32_img_per_s"] = args.batch_size * args.authors_steps / (args.steps * (time.perf_counter() - t))
    if args.check:
        n = min(args.check, args.batch_size)
        noise = initial_noise(cfg.model, idx[:n], 0).to(device)
        with torch.no_grad():
            ref = authors_flow_sampler(model, noise, labels[:n].to(device), args.steps, args.cfg_scale, objective.shift)
        ours = generate(model, objective, idx[:n], labels[:n], steps=args.steps, cfg_scale=args.cfg_scale, seed=0)
        res["check_images"] = n
        res["rel_fp32_vs_authors"] = rel(ours, ref)
        for name, lat in z.items():
            res[f"rel_{name}_vs_authors"] = rel(lat[:n], ref)
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="ProMoE-XL,DiT-XL", help="comma-separated presets")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (x2 forward rows with CFG)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.depth=4 model.input_size=16")
    p.add_argument("--backend", default="auto", help="expert backend: auto | grouped | megablocks | loop")
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (default; --no-bf16 needs --no-compile for MoE presets: grouped GEMMs "
                        "compile in bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the model under torch.compile (default)")
    p.add_argument("--authors-steps", type=int, default=0, help="time the authors' sampler over this many steps")
    p.add_argument("--check", type=int, default=8, help="images compared with the authors' fp32 sampler (0: none)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU (use --device cpu with a small preset)")
    for preset in args.models.split(","):  # each model's lines as soon as it is done
        r = bench_model(preset, args, device)
        print(json.dumps(r), flush=True)
        fast = (f", compiled {r['compiled_img_per_s']:.2f} img/s = {r['compiled_over_eager']:.2f}x "
                f"(compile {r['compile_s']:.0f} s)") if args.compile else ""
        authors = f", authors' sampler fp32 {r['authors_fp32_img_per_s']:.2f} img/s" if args.authors_steps else ""
        print(f"{r['model']} {r['device']}: eager {r['eager_img_per_s']:.2f} img/s{fast}{authors} ({args.steps} Euler "
              f"steps, CFG {args.cfg_scale:g}, batch {args.batch_size}, {r['precision']}, {r['backend']} experts; "
              "latents only)", flush=True)


if __name__ == "__main__":
    main()
