"""Resume on another layout: AdamW's state per parameter in full, whichever optimizer holds it.

A checkpoint's ``promoe/`` files keep, next to each parameter's weights and EMA, its AdamW state in full:
``exp_avg`` and ``exp_avg_sq`` (float32, the parameter's shape) and ``step``; routed experts are written by
the expert writers and indexed by global expert id like their weights. ``full_adamw_state`` gathers it from
the optimizer in use:

- ZeRO-1/2 (DeepSpeed's partitioned optimizer over dense and expert param groups): a parameter's state is
  spread over the flat partitions of its data-parallel group (the expert-data-parallel group for routed
  experts); each rank puts its fragment (DeepSpeed's ``_hp_mapping`` addresses) into a zero tensor of the
  parameter's size and an all-reduce over that group assembles it, as
  ``deepspeed.utils.safe_get_full_optimizer_state`` does. That function itself cannot be used: DeepSpeed
  links the fragments to the moments once, after the first param group's first step, when the expert
  groups have no moments yet, so for every expert parameter it finds none. The step count is per param
  group (one per flat partition).
- ZeRO-0: torch's AdamW (DeepSpeed's) or the trainer's AdamWEMA (``train.fused_ema``; a bf16 weight's state
  is its float32 master's): state and step count per parameter.

``load_adamw_state`` writes it into a freshly built engine of any layout (the flat partitions' moments are
filled fragment by fragment from the full tensors, then handed to the base optimizer's ``load_state_dict``);
``engine_counters`` / ``set_engine_counters`` carry the engine's step and sample counters and the LR
schedule's position through ``meta.json``. A resume on the layout that wrote the checkpoint still loads
DeepSpeed's own files (bit-identical, as fast as before); only another layout takes this path.

Why not DeepSpeed's universal checkpoint (``deepspeed/checkpoint/ds_to_universal.py``): it reassembles ZeRO
partitions offline by parameter name, but the routed experts of different EP ranks carry the same local
parameter name here (DeepSpeed sees them through ``ExpertParamsMarker`` and writes no per-expert files;
promoe-ds writes its own, by global expert id), it has no ZeRO-0 path, and it needs a conversion step
between the jobs of a requeue. The price of this format: each checkpoint also holds the full moments, twice
the float32 weights more in ``promoe/`` (rank 0 writes the dense ones).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from promoe_ds.optim import master

MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_groups(optimizer) -> dict[int, int] | None:
    """ZeRO-1/2: id(parameter) -> its param group; None for an optimizer with state per parameter (ZeRO-0)."""
    if not hasattr(optimizer, "bit16_groups"):
        return None
    return {id(p): i for i, group in enumerate(optimizer.bit16_groups) for p in group}


@torch.no_grad()
def full_adamw_state(engine, model: torch.nn.Module, keep=lambda name: True) -> dict[str, dict]:
    """{name: {"exp_avg", "exp_avg_sq": float32 CPU tensors, "step": float}} of the parameters ``keep`` selects
    (zeros and step 0 before the first update). Every rank must call it (ZeRO-1/2 gathers over the ranks)."""
    optimizer = engine.optimizer
    groups = _zero_groups(optimizer)
    out = {}
    for name, p in model.named_parameters():
        if groups is not None:
            base = optimizer.optimizer.state.get(optimizer.single_partition_of_fp32_groups[groups[id(p)]], {})
            moments = {k: _gather_fragments(p, base[k]) if base else None for k in MOMENTS}
            step = base.get("step", 0)
        else:
            state = optimizer.state.get(master(p), {})
            moments, step = {k: state.get(k) for k in MOMENTS}, state.get("step", 0)
        if keep(name):
            out[name] = {k: torch.zeros(p.shape) if v is None else v.to("cpu", torch.float32, copy=True).view(p.shape)
                         for k, v in moments.items()}
            out[name]["step"] = float(step)
    return out


def _gather_fragments(p: torch.nn.Parameter, flat: torch.Tensor) -> torch.Tensor:
    """``p``'s full tensor from the flat partitions (``flat``: this rank's, on the CPU with an offloaded optimizer)
    of its data-parallel group, on ``p``'s device (the group's collectives run there)."""
    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    fragment = p._hp_mapping  # where this rank's slice of p lies in p and in the flat partition (None: nowhere)
    if fragment is not None:
        hp, lp = fragment.hp_fragment_address, fragment.lp_fragment_address
        full.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
    dist.all_reduce(full, group=p._dp_group)
    return full.view(p.shape)


def _step_value(optimizer, step: float):
    """A step count as ``optimizer`` keeps it: a tensor for torch's AdamW (its load_state_dict moves it where
    the fused or capturable variants want it), a plain number for others (DeepSpeed's CPU Adam)."""
    return torch.tensor(step, dtype=torch.float32) if isinstance(optimizer, torch.optim.AdamW) else int(step)


@torch.no_grad()
def load_adamw_state(engine, model: torch.nn.Module, state: dict[str, dict]) -> None:
    """Set the optimizer of a freshly built engine (no step taken yet) from ``state`` ({name: full_adamw_state's
    entry}, this rank's parameters). ZeRO-1/2 also get their float32 master partitions from the weights
    already in ``model`` (DeepSpeed's own checkpoint would have restored them)."""
    from deepspeed.utils import safe_set_full_fp32_param

    optimizer = engine.optimizer
    groups = _zero_groups(optimizer)
    name_of = {id(master(p)): n for n, p in model.named_parameters()}
    if groups is None:  # state per parameter, keyed by index in param-group order
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        entries = {i: {**{k: state[name_of[id(t)]][k] for k in MOMENTS},
                       "step": _step_value(optimizer, state[name_of[id(t)]]["step"])} for i, t in enumerate(flat)}
        optimizer.load_state_dict({"state": entries, "param_groups": optimizer.state_dict()["param_groups"]})
        return
    base = optimizer.optimizer
    entries = {}
    for i, (group, partition) in enumerate(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups)):
        moments = {k: torch.zeros_like(partition) for k in MOMENTS}
        for p in group:
            safe_set_full_fp32_param(p, master(p).float())
            fragment = p._hp_mapping  # as in _gather_fragments
            if fragment is None:
                continue
            hp, lp = fragment.hp_fragment_address, fragment.lp_fragment_address
            for k in MOMENTS:
                full = state[name_of[id(p)]][k].reshape(-1).narrow(0, lp.start, lp.numel)
                moments[k].narrow(0, hp.start, hp.numel).copy_(full)
        # one step count per param group: the parameters of a group have stepped together (with ZeRO-0 on one
        # rank a parameter that had no gradient in a step did not step: the group takes the largest count)
        step = max((state[name_of[id(p)]]["step"] for p in group), default=0.0)
        entries[i] = {**moments, "step": _step_value(base, step)}
    base.load_state_dict({"state": entries, "param_groups": base.state_dict()["param_groups"]})


def engine_counters(engine) -> dict:
    """The engine's counters and LR schedule position (JSON), for ``set_engine_counters``."""
    scheduler = engine.lr_scheduler
    return {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None}


def set_engine_counters(engine, counters: dict) -> None:
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    if engine.lr_scheduler is not None and counters["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
        # the learning rate the schedule set after the checkpoint's last step (WarmupLR.step(n) sets it for n)
        engine.lr_scheduler.step(counters["lr_scheduler"]["last_batch_iteration"])
