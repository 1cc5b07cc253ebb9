"""Process-group start-up for any launcher: ``deepspeed``, ``torchrun`` or ``srun``.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; srun exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (the sbatch templates export
MASTER_ADDR / MASTER_PORT from the job's first node). A plain ``python`` start is a world of one;
``spawn_local`` starts N ranks on this machine the way torchrun does (tests, the quickstart).
NCCL on GPUs, gloo on CPU (DeepSpeed's CPU accelerator).
"""
from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from promoe_ds.config import ConfigError
from promoe_ds.parallel import watchdog


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


def init_distributed(collective_timeout: float | None = None) -> DistInfo:
    """The process group of this launch; ``collective_timeout`` (s): bound every collective's wait
    (``watchdog.start``), else DeepSpeed's default timeout."""
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
        # DeepSpeed's CPU accelerator compiles its shared-memory op at every start; CXX may be "ccache g++"
        cxx = os.environ.get("CXX", "c++")
        if shutil.which((shlex.split(cxx) or ["c++"])[0]) is None:
            raise ConfigError(f"DeepSpeed on the CPU needs a C++ compiler to build its communication op: {cxx!r} "
                              "not found (install one, e.g. apt-get install g++, or set CXX)")
    import deepspeed  # after DS_ACCELERATOR is set

    timeout = {} if collective_timeout is None else {"timeout": watchdog.start(collective_timeout, rank, world)}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
    return DistInfo(rank, world, local, device, backend)


_given: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on, for a rendezvous on this machine. Taken below the kernel's ephemeral
    range where there is room: other worlds' ranks connect from ephemeral ports, and one of those connections
    could take a port picked from that range before this world's rank 0 listens on it (several worlds
    starting at once on one machine). Never the same port twice in one process."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pick = random.SystemRandom()
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", pick.randrange(10000, low) if low > 11000 else 0))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def spawn_local(nprocs: int, argv: list[str], log_dir: str | Path | None = None,
                env: dict | None = None) -> list[subprocess.Popen]:
    """Start ``argv`` as ranks 0..nprocs-1 of one world on this machine, as torchrun would: RANK /
    WORLD_SIZE / LOCAL_RANK, MASTER_ADDR / MASTER_PORT on a free port, DS_ACCELERATOR=cpu without a
    GPU. Output goes to ``log_dir/rank<r>.log`` if given, else to this process's stdout / stderr.
    ``env`` adds variables. Returns the Popen objects (the caller waits for them)."""
    port = free_port()
    procs = []
    for r in range(nprocs):
        rank_env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(r),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})}
        if not torch.cuda.is_available():
            rank_env["DS_ACCELERATOR"] = "cpu"
        out = open(Path(log_dir) / f"rank{r}.log", "w") if log_dir else None
        procs.append(subprocess.Popen(argv, env=rank_env, stdout=out, stderr=subprocess.STDOUT if out else None))
        if out:
            out.close()  # the child holds its own handle
    return procs
