"""A run directory (``train.out_dir``) belongs to one run: one job at a time, one run's checkpoints.

* One owner. Rank 0 holds a POSIX record lock (``fcntl.lockf``) on ``<out_dir>/run.lock`` for the life of the
  run and writes its host, pid, Slurm job id and start time into the file. The operating system releases the
  lock when the process ends, however it ends (exit, crash, ``kill -9``), so a resumed or requeued job takes it
  again; a second job finds it held and stops with one line naming the holder. POSIX locks are the kind
  network file systems carry between nodes (NFSv3 through lockd, NFSv4, GPFS, Lustre mounted with ``flock``);
  where a file system gives no locks the run warns and goes on unprotected (README, docs/slurm.md).
* One run. A run that starts at step 0 (``train.resume=none``, ``train.init_from``, or an empty directory)
  or from a checkpoint outside this directory finds no checkpoint here; a run resumed from one of this
  directory's tags finds none newer. Otherwise it stops with one line, or, with ``train.overwrite=true``,
  moves those tags (and, for a run from step 0, ``metrics.jsonl``) into ``<out_dir>/replaced-<UTC time>/``:
  nothing is deleted. Checkpoint retention then only ever sees the current run's tags. Records of
  ``metrics.jsonl`` past the step the run starts from move to ``metrics.superseded.jsonl``.

Both checks run on rank 0; every rank raises the same ``ConfigError``, so every rank exits with one line.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from promoe_ds.checkpoint import LATEST, complete_tags
from promoe_ds.config import ConfigError

LOCK = "run.lock"
METRICS = "metrics.jsonl"
SUPERSEDED = "metrics.superseded.jsonl"


def agree(rank: int, fn, *args):
    """``fn(*args)`` on rank 0; its ConfigError (or OSError, on the run directory) raised on every rank as a
    ConfigError. Returns rank 0's result on rank 0, else None."""
    result, message = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except ConfigError as e:
            message = str(e)
        except OSError as e:
            message = f"train.out_dir: {e}"
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConfigError(box[0])
    return result


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def describe(holder: dict) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def lock(out_dir: Path) -> int | None:
    """Create ``out_dir`` and take its lock: the open descriptor, which holds it until closed or the process
    ends; None (after a warning) where the file system has no locks. ConfigError naming the holder if held."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"train.out_dir: cannot create {str(out_dir)!r} ({e.strerror})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP, ENOSYS: no locks on this file system
            os.close(fd)
            print(f"warning: cannot lock {out_dir / LOCK} ({e.strerror}): this file system gives no POSIX locks, "
                  "so a second job in this run directory would not be detected", flush=True)
            return None
        try:  # the holder's own record; a pread, since closing another descriptor of the file would drop our lock
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        holder = holder if isinstance(holder, dict) else {}
        raise ConfigError(f"train.out_dir: {str(out_dir)!r} is in use by another run ({describe(holder)}); "
                          "wait for it to end or stop it, or choose another train.out_dir") from None
    record = json.dumps(holder_info()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def others(ckpt_dir: Path, resume_dir: Path | None) -> list[str]:
    """Complete tags of ``ckpt_dir`` that are not the past of the run about to start from ``resume_dir``."""
    tags = complete_tags(ckpt_dir)
    if resume_dir is None or resume_dir.resolve().parent != ckpt_dir.resolve():
        return tags
    return [t for t in tags if t > resume_dir.name]


def one_run(out_dir: Path, resume_dir: Path | None, start: int, overwrite: bool) -> None:
    """Before a run starts at step ``start`` (from ``resume_dir`` or from scratch): refuse (ConfigError) or, with
    ``overwrite``, move aside the checkpoints of another run (module docstring); then rewind ``metrics.jsonl``."""
    ckpt_dir = out_dir / "checkpoints"
    theirs = others(ckpt_dir, resume_dir)
    if theirs and not overwrite:
        origin = "step 0" if resume_dir is None else f"{str(resume_dir)!r} (step {start})"
        raise ConfigError(
            f"train.out_dir: {str(out_dir)!r} holds checkpoints of another run ({', '.join(theirs)}) and this run "
            f"starts from {origin}: choose another train.out_dir, continue that run with train.resume=auto, or "
            "set train.overwrite=true to move them into a replaced-<time>/ folder of the run directory")
    if theirs:
        aside = out_dir / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
        aside.mkdir()
        for tag in theirs:
            os.replace(ckpt_dir / tag, aside / tag)
        latest = ckpt_dir / LATEST
        if latest.is_file() and not (ckpt_dir / latest.read_text().strip()).is_dir():
            os.replace(latest, aside / LATEST)
        if resume_dir is None and (out_dir / METRICS).is_file():
            os.replace(out_dir / METRICS, aside / METRICS)
        print(f"train.overwrite: moved {', '.join(theirs)} of another run into {aside}", flush=True)
    rewind_metrics(out_dir, start)


def rewind_metrics(out_dir: Path, start: int) -> None:
    """Records of ``metrics.jsonl`` past ``start`` (steps logged after the checkpoint a run resumes from, before a
    crash; or all of an earlier run's when this one starts at step 0) move to ``metrics.superseded.jsonl``: the
    steps are trained again, and each step is logged once."""
    path = out_dir / METRICS
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            later = json.loads(line)["step"] > start
        except (ValueError, KeyError, TypeError):  # a line cut by a crash
            later = True
        (drop if later else keep).append(line)
    if drop:
        with open(out_dir / SUPERSEDED, "a") as f:
            f.writelines(drop)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
        print(f"{len(drop)} record(s) of {path} past step {start} moved to {out_dir / SUPERSEDED}", flush=True)
