"""AdamW and the EMA of the weights in one pass over the parameters (``train.fused_ema``).

Torch's fused AdamW reads weight, gradient and both moments and writes weight and moments (28 bytes per fp32
parameter); the EMA then reads the new weight and its average again and writes the average (12 more). Here
both run in one function that inductor compiles into kernels doing both per element: 36 bytes per parameter
instead of 40, and one pass fewer over the largest tensors of a step whose optimizer part is bound by memory
bandwidth (ProMoE-XL: 1567M parameters against dense DiT-XL's 675M, docs/performance.md).

``train.bf16_weights`` (with it): the weights that bf16 autocast would cast to bf16 at every forward are kept
in bf16 (``keep_bf16_weights``), AdamW steps their float32 masters, and the same pass writes the bf16 copies.
A step then neither casts those weights in the forward (4 bytes read, 2 written per weight) nor their bf16
gradients back to float32 in the backward (2 read, 4 written); the gradient norm and AdamW read 2-byte
gradients and the pass writes 2 bytes more: ~12 bytes fewer per weight and step where the casts were kernels
of their own (expert weights are cast where their bias columns are appended, which stays as a bf16 copy:
~4 bytes there; docs/performance.md). The arithmetic is
autocast's: the forward sees bf16(master) either way, the gradient is the same bf16 tensor, and the master
steps in float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from promoe_ds.models.experts import ExpertGroup


def gemm_operands(model: nn.Module) -> list[nn.Parameter]:
    """The parameters bf16 autocast casts to bf16 at every forward: those of linear and conv layers, and the
    expert weights (``ExpertGroup.gemm_operands``)."""
    out = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out += module.parameters(recurse=False)
        elif isinstance(module, ExpertGroup):
            out += module.gemm_operands()
    return out


def keep_bf16_weights(model: nn.Module) -> None:
    """Stores ``gemm_operands(model)`` in bf16 (the same Parameter objects), each with its float32 value as
    ``p.master``: what AdamWEMA steps and checkpoints hold. The rest (label table, prototypes: the routing runs
    in float32) stays as it is."""
    for p in gemm_operands(model):
        p.master = p.data  # the float32 storage itself (a copy would leave the original's memory to the cache)
        p.data = p.data.to(torch.bfloat16)


def master(p: nn.Parameter) -> torch.Tensor:
    """A parameter's full-precision value: its float32 master under ``keep_bf16_weights``, else itself."""
    return getattr(p, "master", p)


@torch.no_grad()
def adamw_ema_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], emas: list[torch.Tensor] | None, step: torch.Tensor,
               lr: torch.Tensor, grad_scale: torch.Tensor, copies: list[torch.Tensor] | None, *, beta1: float,
               beta2: float, eps: float, weight_decay: float, ema_decay: float) -> None:
    """One AdamW step (decoupled weight decay; torch's AdamW with ``grad_scale``: gradients divided by it
    first), then ``ema <- ema + (1 - ema_decay) (param - ema)`` of the updated weights where ``emas`` is given
    (one per parameter), and ``copies`` (bf16 weights, one per parameter) set to them where given. ``step``
    (the count including this step), ``lr`` and ``grad_scale``: 0-d float32 tensors on the parameters' device,
    so neither a new learning rate nor a new step recompiles it. Gradients may be bf16 (read as float32)."""
    g = torch._foreach_div([t.float() for t in grads], grad_scale)
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1.0 - beta2)
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, torch.sqrt(1.0 - torch.pow(beta2, step)))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, lr / (1.0 - torch.pow(beta1, step)))
    torch._foreach_sub_(params, update)
    if emas is not None:
        torch._foreach_lerp_(emas, params, 1.0 - ema_decay)
    if copies is not None:
        torch._foreach_copy_(copies, params)


class AdamWEMA(torch.optim.AdamW):
    """Torch's fused AdamW (its param groups and state: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter, so
    a checkpoint of either resumes the other) whose ``step()`` runs ``adamw_ema_`` compiled: the update and the
    EMA of the updated weights in one pass. ``averages``: parameter -> its float32 EMA (the EMA's share on this
    rank; parameters without one get the AdamW update alone). A parameter with a float32 master
    (``keep_bf16_weights``): the master stands in its param group (a float32 state, as without it), the step
    reads the parameter's bf16 gradient and writes the updated master into the parameter.
    Before ``step()`` the trainer's ZeRO-0 step sets
    ``grad_scale`` (clipping: every gradient divided by it) and ``overflow`` (the host's copy of the device flag
    it gives torch's AdamW as ``found_inf``: skip the whole update, step count included).

    A parameter without a gradient in a step (an unconditional expert when no label was dropped) steps with a
    zero gradient, as DeepSpeed's gradient reduction makes it on several ranks (torch's AdamW would skip it on
    one rank only), so the argument lists never change: built once, one compiled variant each. The step runs
    right after the trainer's host sync, while the GPU waits for its host work: inductor's per-input size
    checks (two thousand for ProMoE-XL; dynamo's guards check the same) are off."""

    def __init__(self, params, averages: dict[torch.Tensor, torch.Tensor], ema_decay: float, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float):
        groups = list(params)
        groups = groups if groups and isinstance(groups[0], dict) else [{"params": groups}]
        self.model_param = {master(p): p for g in groups for p in g["params"] if master(p) is not p}
        super().__init__([{**g, "params": [master(p) for p in g["params"]]} for g in groups], lr=lr,
                         betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
        self.averages, self.ema_decay = averages, ema_decay
        self.grad_scale, self.overflow = None, False
        options = {k: False for k in ("size_asserts", "alignment_asserts") if k in torch._inductor.list_options()}
        self._one_pass = torch.compile(adamw_ema_, dynamic=False, options=options)
        self._plans = None  # per param group: its state's tensor lists (built at the first step)

    def zero_grad(self, set_to_none: bool = True):
        """The param groups' gradients and those of the bf16 parameters (they get the gradients, not their
        masters)."""
        super().zero_grad(set_to_none)
        for p in self.model_param.values():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plans = None  # new state tensors

    def _plan(self, params: list[torch.Tensor]):
        """(step counts, [(params, their model parameters, exp_avgs, exp_avg_sqs, EMAs or None, bf16 copies or
        None)]: one part per (with an EMA or not, a master of a bf16 parameter or not))."""
        for p in params:
            state = self.state[p]
            if not state:  # torch's fused AdamW's layout
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        owner = {p: self.model_param.get(p, p) for p in params}
        parts = []
        for ema in (True, False):
            for bf16 in (True, False):
                ps = [p for p in params if (owner[p] in self.averages) == ema and (p in self.model_param) == bf16]
                if ps:
                    models = [owner[p] for p in ps]
                    parts.append((ps, models, [self.state[p]["exp_avg"] for p in ps],
                                  [self.state[p]["exp_avg_sq"] for p in ps],
                                  [self.averages[m] for m in models] if ema else None, models if bf16 else None))
        return [self.state[p]["step"] for p in params], parts

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "AdamWEMA.step takes no closure"
        if self.overflow:
            return None
        if self._plans is None:
            self._plans = [self._plan(group["params"]) for group in self.param_groups]
        for group, (steps, parts) in zip(self.param_groups, self._plans):
            if not steps:
                continue
            torch._foreach_add_(steps, 1.0)
            dev = steps[0].device
            lr = torch.full((), group["lr"], dtype=torch.float32, device=dev)  # a fill kernel: no host copy
            scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=dev)
            beta1, beta2 = group["betas"]
            for ps, models, exp_avgs, exp_avg_sqs, emas, copies in parts:
                grads = [torch.zeros_like(m) if m.grad is None else m.grad for m in models]
                self._one_pass(ps, grads, exp_avgs, exp_avg_sqs, emas, steps[0], lr, scale, copies, beta1=beta1,
                               beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                               ema_decay=self.ema_decay)
        return None
