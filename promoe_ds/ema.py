"""EMA of the weights (decay 0.9999 in the paper; every reported result uses it).

Float32, sharded the way ZeRO shards optimizer state: the ranks that hold the same copy of a weight (every
rank for the dense weights; for a routed expert, the expert-data-parallel ranks of the expert-parallel rank
that owns it) split its EMA between them, whole tensors, each to the least-loaded rank. A rank updates its
share from its own copy of the weights: no communication per step, and per rank about 1/N of the EMA's memory and
memory traffic (N: that group's size). ``state_dict`` gathers the full EMA (checkpoints).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


def _owners(params: list[nn.Parameter], groups: list, me: int) -> list[int]:
    """Global rank that keeps each parameter's EMA (``me`` where the group is None): per group, largest tensors
    first, each to the group rank with the fewest elements so far (the same answer on every rank of the group:
    same shapes, same order)."""
    owner = [me] * len(params)
    for group in {g for g in groups if g is not None}:
        idx = [i for i, g in enumerate(groups) if g is group]
        load = [0] * dist.get_world_size(group)
        for i in sorted(idx, key=lambda i: -params[i].numel()):
            r = min(range(len(load)), key=load.__getitem__)
            load[r] += params[i].numel()
            owner[i] = dist.get_global_rank(group, r)
    return owner


class EMA:
    def __init__(self, model: nn.Module, decay: float, replicas: Callable[[nn.Parameter], object] | None = None):
        """``replicas(p)``: the process group of the ranks that hold the same copy of ``p`` (None: this rank
        alone); without it every rank keeps the EMA of all its parameters."""
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.groups = [replicas(p) if replicas else None for p in self.params]
        me = dist.get_rank() if dist.is_initialized() else 0
        self.owner = _owners(self.params, self.groups, me)
        self.shadow = {i: p.detach().float().clone() for i, p in enumerate(self.params) if self.owner[i] == me}

    def averages(self) -> dict[nn.Parameter, torch.Tensor]:
        """This rank's share: parameter -> its EMA tensor (``optim.AdamWEMA`` updates them in its own pass)."""
        return {self.params[i]: t for i, t in self.shadow.items()}

    @torch.no_grad()
    def update(self) -> None:
        # shadow <- decay * shadow + (1 - decay) * param, for this rank's share
        if self.shadow:
            torch._foreach_lerp_(list(self.shadow.values()), [self.params[i].detach().float() for i in self.shadow],
                                 1.0 - self.decay)

    @torch.no_grad()
    def state_dict(self, keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
        """The full EMA, {name: float32 CPU copy}, or the names ``keep`` selects on this rank (a checkpoint
        writer's part): each tensor broadcast from its owner to its group, one at a time (the device holds one
        more tensor at most). Every rank must call it."""
        out = {}
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            t = self.shadow.get(i)
            if t is None:
                t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            if self.groups[i] is not None and dist.get_world_size(self.groups[i]) > 1:
                dist.broadcast(t, src=self.owner[i], group=self.groups[i])
            if keep(name):
                out[name] = t.to("cpu", copy=True)  # a snapshot, also where the EMA itself lives on the CPU
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """From the full EMA (every name); this rank keeps its share."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for i, s in self.shadow.items():
            s.copy_(state[self.names[i]])
