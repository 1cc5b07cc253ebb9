"""Host time per rank and step for the step's random draws and a synthetic batch, against world size.

The trainer draws noise, timesteps and label dropout per sample of the global batch
(``train.step_draws``); a rank draws only its own rows, so this host work must not grow with the
number of ranks. CPU only, one thread, as the trainer's main thread would:

    python -m bench.draws [--micro 32] [--worlds 1,8,64]
"""
import argparse
import time

import torch

from promoe_ds.config import load_config
from promoe_ds.data import SyntheticSource
from promoe_ds.diffusion import build_objective
from promoe_ds.train import step_draws


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", type=int, default=32, help="per-rank micro-batch")
    ap.add_argument("--worlds", default="1,8,64")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/promoe_xl.yaml", ["data.source=synthetic"])
    objective, shape = build_objective(cfg.objective), (4, 32, 32)
    print("| ranks | global batch | draws + synthetic batch, ms per rank and step |\n|---|---|---|")
    for world in map(int, args.worlds.split(",")):
        rank = world - 1  # the last rank: the most rows before it
        src = SyntheticSource(shape, 1000, args.micro, rank, world, 0)
        start = time.perf_counter()
        for s in range(args.steps):
            step_draws(objective, cfg, s, shape, range(rank * args.micro, (rank + 1) * args.micro))
            src.next_batch()
        print(f"| {world} | {world * args.micro} | {(time.perf_counter() - start) / args.steps * 1e3:.2f} |")


if __name__ == "__main__":
    main()
