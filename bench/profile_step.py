"""Where a train step's time goes, for configurations of bench/train_step.py side by side (GPU).

For each configuration: the step's phases timed with CUDA events (forward with loss, backward, grad
clipping, AdamW, EMA), then one torch.profiler pass whose CUDA kernels are summed into categories
(dense GEMM, grouped expert GEMM, attention, inductor's fused kernels, optimizer kernels, ...).
Prints both as ms per step, one column per configuration plus the difference to the first one, and
optionally the top kernels of each.

    python bench/profile_step.py                                   # dense-compiled vs grouped-compiled, batch 64
    python bench/profile_step.py --configs grouped-compiled --top 30
    python bench/profile_step.py --fused-ema      # AdamW and the EMA in one pass (train.fused_ema): in "optimizer"
    python bench/profile_step.py --fused-ema --bf16-weights   # with the GEMM weights in bf16 (train.bf16_weights)
"""
import argparse
import functools
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import torch

from promoe_ds.profiling import CATEGORIES, by_category

sys.path.insert(0, str(Path(__file__).parent))
from train_step import CONFIGS, make_step  # noqa: E402  (the step the benchmark times)

from timing import kernels_ms  # noqa: E402

PHASES = ("forward", "backward", "clip", "optimizer", "ema")  # make_step's marks


def _mark(names: list, events: list, phase: str) -> None:
    """A phase boundary: its name and an event recorded on the stream."""
    names.append(phase)
    events.append(torch.cuda.Event(enable_timing=True))
    events[-1].record()


def phase_ms(step, steps: int) -> dict[str, float]:
    """Mean ms per phase over ``steps`` steps (events between phase boundaries)."""
    sums = defaultdict(float)
    for i in range(steps):
        events = [torch.cuda.Event(enable_timing=True)]
        events[0].record()
        names = []
        step(i, functools.partial(_mark, names, events))
        torch.cuda.synchronize()
        for name, a, b in zip(names, events, events[1:]):
            sums[name] += a.elapsed_time(b) / steps
    return dict(sums)


def table(title: str, rows: list[str], cols: dict[str, dict[str, float]]) -> str:
    names = list(cols)
    diff = f" | {names[-1]} - {names[0]} |" if len(names) > 1 else " |"
    out = [f"| {title} (ms/step) | " + " | ".join(names) + diff,
           "|---" * (len(names) + 1 + (len(names) > 1)) + "|"]
    for r in rows + ["total"]:
        vals = [sum(c.values()) if r == "total" else c.get(r, 0.0) for c in cols.values()]
        diff = f" {vals[-1] - vals[0]:+.1f} |" if len(vals) > 1 else ""
        out.append(f"| {r} | " + " | ".join(f"{v:.1f}" for v in vals) + " |" + diff)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="dense-compiled,grouped-compiled", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (phases); the profiler pass takes 2")
    ap.add_argument("--top", type=int, default=0, help="also print each configuration's top kernels")
    ap.add_argument("--fused-ema", action="store_true", help="AdamW and the EMA in one compiled pass (optim.AdamWEMA)")
    ap.add_argument("--bf16-weights", action="store_true", help="with --fused-ema: train.bf16_weights")
    args = ap.parse_args()
    if args.bf16_weights and not args.fused_ema:
        ap.error("--bf16-weights needs --fused-ema")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}"
          f"{'  --fused-ema' if args.fused_ema else ''}{'  --bf16-weights' if args.bf16_weights else ''}", flush=True)
    phases, cats = {}, {}
    for name in args.configs.split(","):
        _, step = make_step(*CONFIGS[name], args.batch, args.fused_ema, args.bf16_weights)
        for i in range(5):  # compile and warm up
            step(i)
        phases[name] = phase_ms(step, args.steps)
        calls = itertools.count()
        kernels = kernels_ms(lambda step=step, calls=calls: step(next(calls)), 2)
        cats[name] = by_category(kernels)
        print(f"{name}: {sum(phases[name].values()):.1f} ms/step", flush=True)
        if args.top:
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]
            print("\n".join(f"  {ms:7.2f} ms  {k[:150]}" for k, ms in top), flush=True)
        del step
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    print()
    print(table("phase", list(PHASES), phases))
    print()
    print(table("CUDA kernels", [c for c, _ in CATEGORIES], cats))
    print("\nstep time not covered by kernels (GPU idle: launch or host overhead, with the per-step sync of the "
          "phase timing): " + ", ".join(f"{n} {sum(phases[n].values()) - sum(cats[n].values()):.1f} ms"
                                        for n in phases))


if __name__ == "__main__":
    main()
