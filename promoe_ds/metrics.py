"""Training metrics: a progress line on rank 0, ``metrics.jsonl`` in the run directory, and wandb.

Scalars are averaged over the ranks and the steps since the last log; the expert load (fraction of
assignments each routed expert received, per MoE layer) is summed over all ranks. On GPUs,
``mem_peak_gib`` is the peak of the memory torch's allocator reserved on the device since the last log,
on the rank that reserved the most.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from promoe_ds.config import ConfigError

# dense bf16 peak of the GPUs MFU is reported for (TFLOP/s)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def train_flops_per_image(model_cfg, activated_params: int) -> float:
    """fwd+bwd = 3 x forward; forward = 2 FLOPs per activated weight per token + attention scores."""
    tokens = (model_cfg.input_size // model_cfg.patch_size) ** 2
    attn = 4 * tokens * tokens * model_cfg.hidden_size * model_cfg.depth
    return 3 * (2 * activated_params * tokens + attn)


class MetricsLogger:
    def __init__(self, out_dir: Path, rank: int, device: torch.device, global_batch: int, world_size: int,
                 flops_per_image: float, wandb_cfg, run_config: dict):
        self.rank, self.device, self.global_batch, self.world = rank, device, global_batch, world_size
        self.flops_per_image, self.peak = flops_per_image, peak_flops(device)
        self.sums: dict[str, float] = {}
        self.load = None
        self.n = self.steps = self.skipped = 0
        self.t0 = time.time()
        self.wandb = None
        if rank == 0 and wandb_cfg.mode != "disabled":
            import wandb

            try:
                self.wandb = wandb.init(mode=wandb_cfg.mode, project=wandb_cfg.project, name=wandb_cfg.name or None,
                                        dir=wandb_cfg.dir or str(out_dir), config=run_config, resume="allow")
            except wandb.errors.Error as e:  # no API key, no network, a bad project name
                raise ConfigError(f"wandb.mode={wandb_cfg.mode}: {e} (log in with `wandb login` or set "
                                  "WANDB_API_KEY, or use wandb.mode=offline)") from None
        self.jsonl = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None

    def start(self) -> None:
        """The first log interval's clock starts here, after start-up (model, engine, checkpoint loading)."""
        self.t0 = time.time()

    def add(self, scalars: dict[str, torch.Tensor], counts: torch.Tensor | None, keep: torch.Tensor) -> None:
        """One micro-batch's scalars and expert load, left out where ``keep`` (a 0/1 tensor) is 0. Everything
        stays on the device (no sync per step) until the next log."""
        for k, v in scalars.items():
            v = torch.as_tensor(v, device=self.device).detach().to(torch.float64)
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(keep > 0, v, 0.0)
        if counts is not None:
            c = torch.where(keep > 0, counts.detach().to(torch.float64), 0.0)
            self.load = c if self.load is None else self.load + c
        self.n = self.n + keep.to(torch.float64)

    def step(self, applied: bool = True) -> None:
        """One optimizer step (global batch) done, its update ``applied`` or skipped: throughput counts these,
        not micro-batches."""
        self.steps += 1
        self.skipped += not applied

    def log(self, step: int, extra: dict[str, float], summed: dict[str, float] | None = None) -> dict:
        """Reduce over ranks and print/write; call on every rank. ``extra``: rank 0's values; ``summed``: counts
        summed over the ranks. An interval whose every update was skipped has no loss: its record says
        ``skipped`` (steps of the interval skipped, as in every record) without loss or expert load."""
        all_skipped = self.steps > 0 and self.skipped == self.steps  # the same on every rank
        keys = [] if all_skipped else sorted(self.sums)
        n = torch.as_tensor(self.n, dtype=torch.float64, device=self.device).clamp(min=1)
        vec = (torch.stack([self.sums[k] for k in keys]) / n).cpu() if keys else torch.zeros(0, dtype=torch.float64)
        load = self.load.cpu() if self.load is not None and not all_skipped else None
        totals = torch.tensor(list((summed or {}).values()), dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            vec = vec.to(dev)
            dist.all_reduce(vec)
            vec = vec.cpu() / dist.get_world_size()
            if load is not None:
                load = load.to(dev)
                dist.all_reduce(load)
                load = load.cpu()
            if summed:
                totals = totals.to(dev)
                dist.all_reduce(totals)
                totals = totals.cpu()
        extra = {**extra, **{k: int(v) for k, v in zip(summed or {}, totals.tolist())}}
        if self.device.type == "cuda":  # peak memory of the window, the largest over the ranks (an OOM's margin)
            # reserved, not allocated: a CUDA graph's replay uses its private pool without allocating
            peak = torch.tensor([torch.cuda.max_memory_reserved(self.device) / 2**30], device=self.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            extra = {**extra, "mem_peak_gib": peak.item()}
            torch.cuda.reset_peak_memory_stats(self.device)
        elapsed = time.time() - self.t0
        ips = self.global_batch * self.steps / max(elapsed, 1e-9)
        rec = {"step": step, **dict(zip(keys, vec.tolist())), "skipped": self.skipped, **extra, "img_per_sec": ips,
               "img_per_sec_per_gpu": ips / self.world, "world_size": self.world, "global_batch": self.global_batch,
               "time": time.time()}
        if self.peak:
            rec["mfu"] = ips / self.world * self.flops_per_image / self.peak
        if load is not None:
            frac = load / load.sum(1, keepdim=True).clamp(min=1)
            rec["expert_load"] = [[round(v, 4) for v in row] for row in frac.tolist()]
            rec["router/load_max_over_mean"] = float((frac.max(1).values * frac.shape[1]).mean())
            rec["router/unused_experts"] = int((load == 0).sum())
        if self.rank == 0:
            parts = " | ".join(f"{k} {rec[k]:.4f}" for k in keys) if keys else "skipped: no loss (non-finite)"
            if self.skipped and keys:
                parts += f" | skipped {self.skipped} of {self.steps} steps"
            mfu = f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
            mem = f" | mem {rec['mem_peak_gib']:.1f} GiB" if "mem_peak_gib" in rec else ""
            print(f"step {step:>7d} | {parts} | grad_norm {rec.get('grad_norm', float('nan')):.3f} | "
                  f"lr {rec.get('lr', 0):.2e} | {ips:.1f} img/s{mfu}{mem}", flush=True)
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
            if self.wandb is not None:
                flat = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
                if load is not None:
                    for i, row in enumerate(frac.tolist()):
                        flat.update({f"expert_load/layer{i}/e{j}": v for j, v in enumerate(row)})
                self.wandb.log(flat, step=step)
        self.sums, self.load, self.n, self.steps, self.skipped, self.t0 = {}, None, 0, 0, 0, time.time()
        return rec

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
