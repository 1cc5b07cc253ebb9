"""Process-group start-up for any launcher: ``deepspeed``, ``torchrun`` or ``srun``.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; srun exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (the sbatch templates export
MASTER_ADDR / MASTER_PORT from the job's first node). A plain ``python`` start is a world of one.
NCCL on GPUs, gloo on CPU (DeepSpeed's CPU accelerator).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def launcher_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed() -> DistInfo:
    rank, world, local = launcher_env()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed  # after DS_ACCELERATOR is set

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(rank, world, local, device, backend)
