"""Checkpoints: DeepSpeed engine state plus promoe-ds' own layout-independent weight files.

``<out_dir>/checkpoints/<tag>/`` holds
- DeepSpeed's files (module, ZeRO optimizer partitions, scheduler): a resume on the same layout (world
  size, ep_size, ZeRO stage) loads them, bit-identical to an uninterrupted run;
- ``promoe/dense.pt`` (rank 0): float32 weights, EMA and AdamW state (both moments, step count: reshard.py)
  of everything but the routed experts;
- ``promoe/experts_ep<k>.pt`` (the first expert-data-parallel replica of EP rank k): the same for the
  routed experts that rank owns, with the global id of its first expert;
- ``promoe/rank<r>.pt`` (every rank): RNG states, data-loader position, a digest of its parameters;
- ``meta.json`` (rank 0, written last): step, layout, the engine's counters and LR schedule position,
  config; its presence marks the tag complete.
A resume on another layout (world size, ep_size, ZeRO stage, gradient accumulation) reads only ``promoe/``
and ``meta.json``: each rank takes its parameters' rows (its experts by global id) and hands the AdamW state
to the optimizer it has (reshard.load_adamw_state). ``<out_dir>/checkpoints/latest`` names the newest
complete tag; it is replaced atomically only after every rank has finished writing, so a crash mid-write
never leaves it pointing at a broken tag. Export (``promoe-ds export``) reads only ``promoe/`` and
``meta.json`` too.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from promoe_ds.config import ConfigError, RunError, model_config_diff
from promoe_ds.models.moe import routed_expert_layer
from promoe_ds.optim import master
from promoe_ds.reshard import full_adamw_state, load_adamw_state, set_engine_counters

META = "meta.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:  # torch's file writer names neither the file nor the errno (a full disk among them)
        raise OSError(errno.EIO, _torch_write_error(e), str(path)) from None
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_state(model: torch.nn.Module, ema_state: dict, keep=lambda name: True,
                adamw_state: dict | None = None) -> tuple[dict, dict]:
    """(dense, routed) dicts of {name: {"model": fp32 CPU copy, "ema": ema_state[name], **adamw_state[name]}} of
    the parameters ``keep`` selects (``ema_state``: CPU copies, from ``EMA.state_dict``; ``adamw_state``: from
    ``reshard.full_adamw_state``); a bf16 weight's is its float32 master."""
    dense, routed = {}, {}
    for name, p in model.named_parameters():
        if not keep(name):
            continue
        entry = {"model": master(p).detach().to("cpu", torch.float32, copy=True), "ema": ema_state[name],
                 **(adamw_state or {}).get(name, {})}
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
    """Write tag ``step`` on every rank, then (rank 0) its ``meta.json``, ``latest`` and the retention of
    ``keep_last`` tags. A file that cannot be written (full disk, I/O error) on any rank: every rank raises the
    same ``CheckpointWriteError`` naming it and the free space; the previous complete tag stays ``latest``."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    error = None
    try:  # DeepSpeed's collectives come before its first write, but for the barrier that ends it
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    except (OSError, RuntimeError) as e:
        error = write_error(e, tag_dir, ckpt_dir)
        dist.barrier()  # the barrier that ends save_checkpoint on the ranks whose writes went through
    files = own_files(engine, model, ema, rank_state, rank=rank, ep_rank=ep_rank,
                      expert_writer=expert_writer)  # collective
    if error is None:
        try:
            (tag_dir / "promoe").mkdir(parents=True, exist_ok=True)
            for name, obj in files.items():
                _atomic_save(obj, tag_dir / "promoe" / name)
        except OSError as e:
            error = write_error(e, tag_dir, ckpt_dir)
    _raise_any(error, tag_dir, rank)
    if rank == 0:
        try:
            _atomic_write_text(json.dumps(meta, indent=1), tag_dir / META)  # the tag is complete from here on
            _atomic_write_text(tag + "\n", ckpt_dir / LATEST)
        except OSError as e:
            error = write_error(e, tag_dir, ckpt_dir)
        else:
            retire(ckpt_dir, tag, keep_last)
    _raise_any(error, tag_dir, rank)
    return tag_dir


def own_files(engine, model, ema, rank_state: dict, *, rank: int, ep_rank: int, expert_writer: bool) -> dict:
    """{file name in ``promoe/``: what this rank writes there} (module docstring). Collective: the EMA and the
    AdamW state are gathered."""

    def writes(name: str) -> bool:
        """CPU copies on the writers only: rank 0 the dense weights, an expert writer its EP rank's experts."""
        return expert_writer if routed_expert_layer(name) else rank == 0

    dense, routed = split_state(model, ema.state_dict(keep=writes), keep=writes,
                                adamw_state=full_adamw_state(engine, model, keep=writes))
    files = {}
    if rank == 0:
        files["dense.pt"] = dense
    if expert_writer and routed:
        first_id = {n: m.routed_experts.first_id for n, m in model.named_modules() if hasattr(m, "routed_experts")}
        files[f"experts_ep{ep_rank:04d}.pt"] = {"ep_rank": ep_rank, "first_id": first_id, "params": routed}
    files[f"rank{rank:05d}.pt"] = rank_state
    return files


def retire(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Retention after ``tag`` became complete: of the complete tags older than it, all but the newest
    ``keep_last - 1`` are deleted (never a newer one), and so are tags a crash left half-written (no meta.json)."""
    older = [t for t in complete_tags(ckpt_dir) if t < tag]
    for old in older[:max(0, len(older) - keep_last + 1)]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    for d in ckpt_dir.glob("step_*"):  # never resumed from; the run directory's lock keeps other jobs' out
        if d.is_dir() and d.name != tag and not (d / META).is_file():
            shutil.rmtree(d, ignore_errors=True)


class CheckpointWriteError(RunError):
    """A checkpoint file could not be written (full disk, I/O error)."""


def _torch_write_error(e: Exception) -> str:
    """torch.save's failure without the C++ source location ("[enforce fail at inline_container.cc:672] . ")."""
    text = str(e).strip().split("\n")[0]
    return "torch.save: " + (text.split("] . ", 1)[-1] if text.startswith("[enforce fail") else text)


def write_error(e: Exception, tag_dir: Path, ckpt_dir: Path) -> str:
    """One line on a failed write: the file (the tag's directory where nothing names it), why, the free space."""
    path = getattr(e, "filename", None) or tag_dir
    why = e.strerror if isinstance(e, OSError) and e.strerror else _torch_write_error(e)
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free on {ckpt_dir}"
    except OSError:
        free = f"free space on {ckpt_dir} unknown"
    return f"cannot write checkpoint {str(path)!r} ({why}; {free})"


def _raise_any(error: str | None, tag_dir: Path, rank: int) -> None:
    """Where any rank failed to write, every rank raises (the first failing rank's message); rank 0 first removes
    the half-written tag (space for the next attempt). Collective."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    first = f"rank {failed[0]}: {errors[failed[0]]}"
    ckpt_dir = tag_dir.parent
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()
    tags = complete_tags(ckpt_dir)
    kept = (f"the previous checkpoint {tags[-1]} is complete and {LATEST!r} names it" if tags else
            "no earlier checkpoint in this run")
    raise CheckpointWriteError(f"{first}: {tag_dir.name} not written, {kept}; free space or move train.out_dir, "
                               "then resume with train.resume=auto")


def find_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """``auto``: the newest complete tag (the one ``latest`` names, unless a crash came between a tag's
    meta.json and ``latest``), else None. ``none``: None. Otherwise a path to a tag directory, which must be
    complete."""
    if resume == "none":
        return None
    if resume != "auto":
        tag_dir = Path(resume)
        if not (tag_dir / META).is_file():
            raise ConfigError(f"train.resume: {resume!r} is not a complete checkpoint (no {META})")
        return tag_dir
    tags = complete_tags(ckpt_dir)
    return ckpt_dir / tags[-1] if tags else None


def check_layout(meta: dict, world_size: int, ep_size: int, zero_stage: int, global_batch: int,
                 tag_dir: Path) -> bool:
    """Whether this run has the layout that wrote the checkpoint (then DeepSpeed's own files are loaded). Another
    layout needs the full AdamW state in ``promoe/`` (meta.json's engine counters come with it), else ConfigError;
    so does another global batch (a step's samples, the data position and the LR schedule are counted in it)."""
    batch = meta["config"]["train"]["global_batch"]
    if batch != global_batch:
        raise ConfigError(f"train.global_batch: {global_batch}, but checkpoint {str(tag_dir)!r} was trained with "
                          f"{batch}: a resumed run keeps its global batch (any world size and micro-batch that divide "
                          "it); to change it, `promoe-ds export` the checkpoint and start a new run with "
                          "train.init_from=FILE train.resume=none in a new train.out_dir")
    theirs = (meta["world_size"], meta["ep_size"], meta["zero_stage"])
    if theirs == (world_size, ep_size, zero_stage):
        return True
    if "engine" not in meta:
        raise ConfigError(
            f"checkpoint {str(tag_dir)!r} was written with world_size={theirs[0]}, ep_size={theirs[1]}, "
            f"zero_stage={theirs[2]} by a promoe-ds that kept no layout-independent optimizer state; this run has "
            f"world_size={world_size}, ep_size={ep_size}, zero_stage={zero_stage}. Resume it on its own layout, or run "
            "`promoe-ds export` on it and start a new run from the file with train.init_from=FILE train.resume=none "
            "and a new train.out_dir (the file's weights, the EMA by default, become the new run's weights and its "
            "EMA starts from them; AdamW's state, the step count, the LR warm-up and the data position start anew)")
    return False


def layout_change(meta: dict, layout: dict) -> str:
    """`` on another layout: world_size 2 -> 1, ...`` naming what differs from the checkpoint's layout ("" if nothing:
    checkpoints without micro_batch / grad_accum count as the same there)."""
    diff = [f"{k} {meta[k]} -> {v}" for k, v in layout.items() if meta.get(k, v) != v]
    resharded = any(meta[k] != layout[k] for k in ("world_size", "ep_size", "zero_stage"))
    return (f" on another layout: {', '.join(diff)}" + (" (weights, EMA, AdamW state, step counters and LR schedule "
            "from promoe/)" if resharded else "") if diff else "")


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


def _my_experts(own: Path, model: torch.nn.Module, hint: str) -> dict:
    """This rank's routed-expert entries from the expert files of any ep_size: per layer, rows [first_id,
    first_id + num) of the experts by global id (the files are memory-mapped: only those rows are read)."""
    mine = {n: m.routed_experts for n, m in model.named_modules() if hasattr(m, "routed_experts")}
    pieces: dict[str, list] = {}
    for f in sorted(own.glob("experts_ep*.pt")) if mine else []:
        part = load_tensors(f, hint, mmap=True)
        for name, entry in part["params"].items():
            pieces.setdefault(name, []).append((part["first_id"][routed_expert_layer(name)], entry))
    out = {}
    for name, parts in pieces.items():
        experts = mine[routed_expert_layer(name)]
        parts = sorted((first, e) for first, e in parts if first < experts.first_id + experts.num
                       and first + len(e["model"]) > experts.first_id)
        start = experts.first_id - parts[0][0] if parts else 0
        out[name] = {k: (max(e[k] for _, e in parts) if k == "step" else
                         torch.cat([e[k] for _, e in parts])[start:start + experts.num].clone()) for k in parts[0][1]}
        if len(out[name]["model"]) != experts.num:
            raise ConfigError(f"checkpoint {str(own.parent)!r} lacks routed experts {experts.first_id}.."
                              f"{experts.first_id + experts.num - 1} of {name} (an experts_ep*.pt file is missing); "
                              f"{hint}")
    return out


@torch.no_grad()
def load(engine, model, ema, tag_dir: Path, meta: dict, *, rank: int, same_layout: bool, all_data: bool) -> dict:
    """Restore engine, weights, EMA from the tag whose ``meta`` (``read_meta``) is given; returns this rank's state
    (another layout: rank 0's); ``all_data``: its "data" is every rank's data-loader position, {"ranks": [...]}
    (the data source re-deals its position over this run's ranks).
    ``same_layout`` (check_layout): DeepSpeed's own files restore the optimizer and counters; else the full
    AdamW state of ``promoe/`` and meta.json's counters do. A file that cannot be read, or weights of other
    shapes than the model's (other model settings), is a ConfigError."""
    hint = resume_hint(tag_dir)
    own = tag_dir / "promoe"
    state = load_tensors(own / "dense.pt", hint)
    state.update(_my_experts(own, model, hint))
    rank_state = load_tensors(own / f"rank{rank if same_layout else 0:05d}.pt", hint, weights_only=False)
    if all_data:
        rank_state["data"] = {"ranks": [load_tensors(own / f"rank{r:05d}.pt", hint, weights_only=False)["data"]
                                        for r in range(meta["world_size"])]}
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in state]
    if missing:
        raise ConfigError(f"checkpoint {str(tag_dir)!r} lacks {len(missing)} parameters, e.g. {missing[0]}")
    for name, p in params.items():
        if state[name]["model"].shape != p.shape:
            raise ConfigError(f"checkpoint {str(tag_dir)!r} holds {name} of shape {list(state[name]['model'].shape)}, "
                              f"this model's is {list(p.shape)}: other model settings than the run that wrote it"
                              f"{model_config_diff(meta['config']['model'], model.cfg, 'the checkpoint')}")
    if same_layout:
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
    if not same_layout:
        load_adamw_state(engine, model, state)
        set_engine_counters(engine, meta["engine"])
    return rank_state
