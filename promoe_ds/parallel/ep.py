"""Expert parallelism on DeepSpeed's own expert / expert-data groups.

Routed experts are split over an expert-parallel (EP) group of ``ep_size`` consecutive ranks
(DeepSpeed's layout: EP group ``[0, 1], [2, 3], ...``; expert-data-parallel group ``[0, 2, ...],
[1, 3, ...]``). ``shard_experts`` keeps this rank's slice of every MoE layer's routed experts (on the
meta device before the weights are made, so no rank builds them all); ``apply_expert_parallel`` gives
every layer an ``AllToAllDispatcher``: tokens travel to the rank that owns their expert with
``all_to_all_single`` using per-rank token counts (dropless: no capacity, no token dropped) and come
back the same way; the backward pass is the reverse exchange. Shared and unconditional experts,
prototypes and the rest of the model stay replicated. The model itself knows nothing of ranks.

DeepSpeed must treat routed-expert parameters as expert parameters (gradients averaged only over
the expert-data-parallel group, ZeRO partitions in their own groups, broadcast inside that group).
It does so for parameters marked ``allreduce=False`` / ``group_name`` once the engine sees an
instance of ``deepspeed.moe.layer.MoE`` in the model: ``ExpertParamsMarker`` is that instance. It
holds no weights and does no compute; promoe-ds saves expert weights itself (see checkpoint.py),
so DeepSpeed's per-expert files are not used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from promoe_ds.models.dit import DiT
from promoe_ds.models.moe import TokenDispatcher


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the gradient of every rank's copy is summed back (d/dx_r of sum_r x_r)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class AllReduceStats:
    """``reduce_stats`` hook of MoEMLP: routing statistics summed over the data-parallel world, so
    the RCL means (Eq. 6) are those of the global micro-batch whatever the world size."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, self.group)


class AllToAllDispatcher(TokenDispatcher):
    """The token dispatcher under expert parallelism: routed expert ``e`` (of ``num_routed``) lives on rank
    ``e // num_local`` of ``group``. ``dispatch`` sorts this rank's assignments by expert, sends the routed
    ones to their experts' ranks and returns what this rank's experts compute: the tokens it received, grouped
    by local expert, then its own tokens for the unconditional experts (ids after the routed ones), which
    every rank holds. ``combine`` sends the routed outputs back and sums every token's outputs (Eq. 5).

    Under torch.compile only the two exchanges run eagerly (their split sizes are read on the host);
    sorting, the expert GEMMs (routed and unconditional) and the gate-weighted sum stay in the
    compiled graph, with the received token count as a dynamic dimension."""

    def __init__(self, group, num_routed: int, num_uncond: int):
        super().__init__(num_routed + num_uncond)
        self.group, self.ep_size = group, dist.get_world_size(group)
        self.num_routed, self.num_local = num_routed, num_routed // self.ep_size
        self.last_recv_counts = None  # [ep_size, num_local] tokens received last call (for tests/stats)

    def dispatch(self, x, tok, exp, gate):
        xs, counts, ctx = super().dispatch(x, tok, exp, gate)
        return (*self._send(xs, counts), ctx)

    def combine(self, ys, ctx):
        return super().combine(self._return(ys), ctx)

    @torch.compiler.disable  # split sizes on the host: eager under torch.compile (a graph break)
    def _send(self, xs, counts):
        """-> (the tokens this rank's experts compute: those received for its routed experts, grouped by local
        expert, then its own for the unconditional experts; their counts per expert). Keeps the routes for
        ``_return`` on the object: returned, their Python ints would become constants of the compiled graph."""
        n_routed = self.num_routed
        recv_counts = torch.empty_like(counts[:n_routed])
        dist.all_to_all_single(recv_counts, counts[:n_routed].contiguous(), group=self.group)  # row j: from rank j
        sizes = torch.cat([counts[:n_routed], recv_counts]).tolist()  # the one host sync: split sizes
        sent, got = sizes[:n_routed], sizes[n_routed:]
        in_splits = [sum(sent[r * self.num_local:(r + 1) * self.num_local]) for r in range(self.ep_size)]
        out_splits = [sum(got[r * self.num_local:(r + 1) * self.num_local]) for r in range(self.ep_size)]
        recv_counts = recv_counts.view(self.ep_size, self.num_local)
        self.last_recv_counts = recv_counts
        n_sent = sum(in_splits)
        recv = _AllToAll.apply(xs[:n_sent], out_splits, in_splits, self.group)
        # received tokens are ordered (source rank, local expert): regroup by local expert
        local_id = torch.repeat_interleave(torch.arange(self.num_local, device=xs.device).repeat(self.ep_size),
                                           recv_counts.flatten(), output_size=sum(out_splits))
        regroup = torch.argsort(local_id, stable=True)
        self._routes = (in_splits, out_splits, torch.argsort(regroup))
        return (torch.cat([recv.index_select(0, regroup), xs[n_sent:]]),
                torch.cat([recv_counts.sum(0), counts[n_routed:]]))

    @torch.compiler.disable
    def _return(self, ys):
        """Routed experts' outputs back to the ranks their tokens came from, in the order they were sent, then
        this rank's unconditional experts' outputs: the order ``dispatch`` sorted the assignments in."""
        in_splits, out_splits, ungroup = self._routes
        n_recv = sum(out_splits)
        back = _AllToAll.apply(ys[:n_recv].index_select(0, ungroup), in_splits, out_splits, self.group)
        return torch.cat([back, ys[n_recv:]])


class ExpertParamsMarker(MoE):
    """Makes DeepSpeed's engine enable its MoE handling (``has_moe_layers``) for the expert
    parameters marked in this model. No weights, no forward."""

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)  # deliberately not MoE.__init__: we bring our own layer
        self.num_experts, self.ep_size = num_experts, ep_size
        self.expert_group_name = group_name(ep_size)
        self.num_local_experts = 0  # DeepSpeed writes/reads no per-expert files for this module
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine calls this on MoE modules; the groups already exist (create_groups)."""


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def create_groups(ep_size: int) -> int:
    """DeepSpeed's expert and expert-data-parallel groups; returns this rank's EP rank."""
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


def shard_experts(model: DiT, ep_size: int, ep_rank: int) -> None:
    """Every MoE layer keeps routed experts ``ep_rank * n .. (ep_rank + 1) * n - 1`` (n = routed / ep_size)."""
    for layer in model.moe_layers():
        if layer.spec.routed % ep_size:
            raise ValueError(f"{layer.spec.routed} routed experts cannot be split over ep_size={ep_size}")
        layer.routed_experts = layer.routed_experts.shard(ep_rank, ep_size)


def apply_expert_parallel(model: DiT, ep_size: int) -> None:
    """Mark routed-expert parameters for DeepSpeed and give every MoE layer the distributed dispatcher and
    statistics. The layers hold this rank's slice of the routed experts (``shard_experts``; see create_groups)."""
    name = group_name(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    layers = model.moe_layers()
    for layer in layers:
        for p in layer.routed_experts.parameters():
            p.allreduce = False
            p.group_name = name
        if ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(ep_group, layer.spec.routed, layer.spec.uncond)
        if dist.get_world_size() > 1:
            layer.reduce_stats = AllReduceStats()
    if layers:
        model.ds_expert_marker = ExpertParamsMarker(layers[0].spec.routed, ep_size)


def replica_group(p: nn.Parameter):
    """The ranks that hold the same copy of ``p``: for a routed expert's parameter (marked by
    apply_expert_parallel) its expert-data-parallel group, for any other every rank."""
    if not getattr(p, "allreduce", True):
        return groups._get_expert_data_parallel_group(p.group_name)
    return dist.group.WORLD


def global_grad_norm(params: list[nn.Parameter], ep_size: int) -> torch.Tensor:
    """L2 norm of the whole model's gradient over all ranks, a float32 0-d tensor equal on every rank, read
    after DeepSpeed's gradient reduction: replicated gradients are then the same on every rank and count
    once; each routed expert's gradient lives on its EP rank only, so their squares are summed over the
    expert-parallel group."""
    held = [p for p in params if p.grad is not None]
    device = held[0].grad.device if held else torch.device("cpu")

    def squares(grads):  # no gradient: a zero made on the device (copying a host tensor there would sync)
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()  # bf16 ones too

    dense = squares([p.grad for p in held if getattr(p, "allreduce", True)])
    expert = squares([p.grad for p in held if not getattr(p, "allreduce", True)])
    if ep_size > 1:
        dist.all_reduce(expert, group=groups._get_expert_parallel_group(group_name(ep_size)))
    return (dense + expert).sqrt()
