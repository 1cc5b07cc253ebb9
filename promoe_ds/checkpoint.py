"""Checkpoints: DeepSpeed engine state plus promoe-ds' own layout-independent weight files.

``<out_dir>/checkpoints/<tag>/`` holds
- DeepSpeed's files (module, ZeRO optimizer partitions, scheduler) for exact resume;
- ``promoe/dense.pt`` (rank 0): float32 weights and EMA of everything but the routed experts;
- ``promoe/experts_ep<k>.pt`` (the first expert-data-parallel replica of EP rank k): weights and EMA
  of the routed experts that rank owns, with the global id of its first expert;
- ``promoe/rank<r>.pt`` (every rank): RNG states, data-loader position, a digest of its parameters;
- ``meta.json`` (rank 0, written last): step, layout, config; its presence marks the tag complete.
``<out_dir>/checkpoints/latest`` names the newest complete tag; it is replaced atomically only after
every rank has finished writing, so a crash mid-write never leaves it pointing at a broken tag.
Export (``promoe-ds export``) reads only ``promoe/`` and ``meta.json``: any world size, ZeRO stage
and ep_size consolidate the same way.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from promoe_ds.config import ConfigError, model_config_diff
from promoe_ds.models.moe import routed_expert_layer
from promoe_ds.optim import master

META = "meta.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_state(model: torch.nn.Module, ema_state: dict, keep=lambda name: True) -> tuple[dict, dict]:
    """(dense, routed) dicts of {name: {"model": fp32 CPU copy, "ema": ema_state[name]}} of the parameters
    ``keep`` selects (``ema_state``: CPU copies, from ``EMA.state_dict``); a bf16 weight's is its float32 master."""
    dense, routed = {}, {}
    for name, p in model.named_parameters():
        if not keep(name):
            continue
        entry = {"model": master(p).detach().to("cpu", torch.float32, copy=True), "ema": ema_state[name]}
        (routed if routed_expert_layer(name) else dense)[name] = entry
    return dense, routed


@torch.no_grad()
def param_digest(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """(sum, sum of squares) of every parameter this rank holds: replicas must agree exactly."""
    return {n: (float(p.double().sum()), float(p.double().square().sum())) for n, p in model.named_parameters()}


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and (d / META).is_file())


def save(engine, model, ema, ckpt_dir: Path, step: int, meta: dict, rank_state: dict, *, rank: int,
         ep_rank: int, expert_writer: bool, keep_last: int) -> Path:
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    own = tag_dir / "promoe"
    own.mkdir(parents=True, exist_ok=True)

    def writes(name: str) -> bool:
        """CPU copies on the writers only: rank 0 the dense weights, an expert writer its EP rank's experts."""
        return expert_writer if routed_expert_layer(name) else rank == 0

    dense, routed = split_state(model, ema.state_dict(keep=writes), keep=writes)
    if rank == 0:
        _atomic_save(dense, own / "dense.pt")
    if expert_writer and routed:
        first_id = {n: m.routed_experts.first_id for n, m in model.named_modules() if hasattr(m, "routed_experts")}
        _atomic_save({"ep_rank": ep_rank, "first_id": first_id, "params": routed}, own / f"experts_ep{ep_rank:04d}.pt")
    _atomic_save(rank_state, own / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _atomic_write_text(json.dumps(meta, indent=1), tag_dir / META)  # the tag is complete from here on
        _atomic_write_text(tag + "\n", ckpt_dir / LATEST)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for d in ckpt_dir.glob("step_*"):  # tags a crash left half-written (no meta.json): never resumed from
            if d.is_dir() and d.name != tag and not (d / META).is_file():
                shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    return tag_dir


def find_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """``auto``: the tag named by ``latest`` if complete, else the newest complete tag, else None.
    ``none``: None. Otherwise a path to a tag directory, which must be complete."""
    if resume == "none":
        return None
    if resume != "auto":
        tag_dir = Path(resume)
        if not (tag_dir / META).is_file():
            raise ConfigError(f"train.resume: {resume!r} is not a complete checkpoint (no {META})")
        return tag_dir
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag_dir = ckpt_dir / latest.read_text().strip()
        if (tag_dir / META).is_file():
            return tag_dir
    tags = complete_tags(ckpt_dir)
    return ckpt_dir / tags[-1] if tags else None


def check_layout(meta: dict, world_size: int, ep_size: int, zero_stage: int, tag_dir: Path) -> None:
    theirs = (meta["world_size"], meta["ep_size"], meta["zero_stage"])
    if theirs != (world_size, ep_size, zero_stage):
        raise ConfigError(
            f"checkpoint {str(tag_dir)!r} was written with world_size={theirs[0]}, ep_size={theirs[1]}, "
            f"zero_stage={theirs[2]}; this run has world_size={world_size}, ep_size={ep_size}, "
            f"zero_stage={zero_stage}. "
            "ZeRO optimizer partitions cannot be re-split: run `promoe-ds export` on it and start from the file "
            "with train.init_from=FILE train.resume=none (weights and EMA carry over, optimizer state restarts)")


def _first_sentence(e: Exception) -> str:
    """An exception's message cut to its first sentence (torch's name the failure, then add advice)."""
    return str(e).strip().split("\n")[0].split(". ")[0] or type(e).__name__


def load_tensors(path: Path, hint: str, *, weights_only: bool = True, mmap: bool = False):
    """``torch.load`` onto the CPU; a truncated, corrupt or missing file is a ConfigError naming it, with ``hint``
    on what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"cannot read {str(path)!r} ({_first_sentence(e)}): truncated, corrupt or not a "
                          f"torch.save file; {hint}") from None


def read_meta(tag_dir: Path, hint: str) -> dict:
    try:
        return json.loads((tag_dir / META).read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"cannot read {str(tag_dir / META)!r} ({e}): truncated or corrupt; {hint}") from None


def resume_hint(tag_dir: Path) -> str:
    """What to resume from when ``tag_dir`` cannot be: the complete tag before it."""
    earlier = [t for t in complete_tags(tag_dir.parent) if t < tag_dir.name]
    return (f"resume from the checkpoint before it with train.resume={tag_dir.parent / earlier[-1]}" if earlier
            else "no earlier complete checkpoint in this run")


@torch.no_grad()
def load(engine, model, ema, tag_dir: Path, meta: dict, *, rank: int, ep_rank: int) -> dict:
    """Restore engine, weights, EMA from the tag whose ``meta`` (``read_meta``) is given; returns this rank's state.
    A file that cannot be read, or weights of other shapes than the model's (other model settings), is a
    ConfigError."""
    hint = resume_hint(tag_dir)
    own = tag_dir / "promoe"
    state = load_tensors(own / "dense.pt", hint)
    expert_file = own / f"experts_ep{ep_rank:04d}.pt"
    if expert_file.is_file():
        state.update(load_tensors(expert_file, hint)["params"])
    rank_state = load_tensors(own / f"rank{rank:05d}.pt", hint, weights_only=False)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in state]
    if missing:
        raise ConfigError(f"checkpoint {str(tag_dir)!r} lacks {len(missing)} parameters, e.g. {missing[0]}")
    for name, p in params.items():
        if state[name]["model"].shape != p.shape:
            raise ConfigError(f"checkpoint {str(tag_dir)!r} holds {name} of shape {list(state[name]['model'].shape)}, "
                              f"this model's is {list(p.shape)}: other model settings than the run that wrote it"
                              f"{model_config_diff(meta['config']['model'], model.cfg, 'the checkpoint')}")
    try:
        engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ConfigError(f"checkpoint {str(tag_dir)!r}: DeepSpeed's files are unreadable ({_first_sentence(e)}); "
                          f"{hint}") from None
    for name, p in params.items():
        p.copy_(state[name]["model"])
        if master(p) is not p:  # a bf16 weight (train.bf16_weights): its float32 master too
            master(p).copy_(state[name]["model"])
    ema.load_state_dict({n: state[n]["ema"] for n in ema.names})
    return rank_state
