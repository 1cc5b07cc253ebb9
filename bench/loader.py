"""Loader throughput: samples/s of one rank for 4x32x32 latents (the trainer's ``next_batch`` loop).

    .venv/bin/python -m bench.loader                      # temp shards, workers 1 and 2
    .venv/bin/python -m bench.loader --data SHARDS --workers 2 4 8 --micro-batch 256 --seconds 20

Without --data it writes 8 shards x 1000 random samples in the encoder's format (~260 MB) to a
temporary folder. Each row times ``next_batch`` after a warm-up (workers started, shuffle buffer
full); the target is >= 5,000 samples/s per rank (10x an H100 training ProMoE-XL).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.encode import write_manifest, write_shard
from promoe_ds.config import DataConfig
from promoe_ds.data import build_latent_source

SHAPE = (4, 32, 32)


def fake_shards(root: Path, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(shards):
        samples = ({"__key__": f"{i * per_shard + j:08d}",
                    "mean.npy": rng.standard_normal((2, *SHAPE)).astype(np.float16),
                    "logvar.npy": rng.uniform(-8, -2, (2, *SHAPE)).astype(np.float16), "cls": int(rng.integers(1000)),
                    "src": f"n{j % 1000:08d}/img_{j}.JPEG"} for j in range(per_shard))
        entries.append(write_shard(root / f"shard-{i:06d}.tar", samples))
    write_manifest(root, entries, vae="random", image_size=256, scale_factor=0.18215, latent_shape=SHAPE,
                   num_classes=1000, skipped=[])


def measure(cfg: DataConfig, micro_batch: int, seconds: float) -> float:
    src = build_latent_source(cfg, latent_shape=SHAPE, num_classes=1000, micro_batch=micro_batch, rank=0,
                              world_size=1, seed=0)
    for _ in range(max(3, 4000 // micro_batch)):  # warm-up: fork workers, fill the shuffle buffers
        src.next_batch()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        z, _ = src.next_batch()
        n += len(z)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="shard folder with manifest.json (default: temporary random shards)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp)
            fake_shards(data, shards=8, per_shard=1000)
        rows = [("synthetic", 0, measure(DataConfig(source="synthetic"), args.micro_batch, args.seconds))]
        for w in args.workers:
            cfg = DataConfig(source="wds", path=str(data), num_workers=w, shuffle_buffer=args.shuffle_buffer,
                             resampled=True)
            rows.append(("wds", w, measure(cfg, args.micro_batch, args.seconds)))
    print(f"\nlatents {'x'.join(map(str, SHAPE))}, micro_batch {args.micro_batch}, shuffle_buffer "
          f"{args.shuffle_buffer}; {os.cpu_count()} CPUs, load average {load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after (other processes compete for the cores)")
    print(f"{'source':<10} {'workers':>7} {'samples/s':>10}")
    for name, w, rate in rows:
        print(f"{name:<10} {w:>7} {rate:>10,.0f}")


if __name__ == "__main__":
    main()
