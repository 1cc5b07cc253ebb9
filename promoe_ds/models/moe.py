"""The ProMoE layer (Sec. 4.1, Eq. 4-6, Algorithm 1) and the baseline routers.

One module, ``MoEMLP``, with four routers:

- ``promoe``: conditional routing (null-label tokens -> unconditional experts, hard, gate 1) then
  prototypical routing of the other tokens (cosine to learnable prototypes, Eq. 4; activation,
  Eq. 2; token-choice top-k without renormalisation, Eq. 3), plus shared experts on every token
  (Eq. 5) and the routing contrastive loss (Eq. 6).
- ``promoe_ec``: the same scores, but each routed expert takes a fixed quota of conditional tokens
  (expert choice), the variant the authors recommend for DDPM.
- ``tc``: token-choice softmax top-k with a load-balancing loss (DiT-MoE / TC-DiT baseline).
- ``ec``: expert-choice softmax router (EC-DiT baseline).

Routing produces a fixed number of (token, expert, gate) assignments per token: conditional tokens
get their top-k routed experts, null-label tokens their unconditional experts (ids after the routed
ones, gate 1). Shapes never depend on the data, so the layer has no host sync on one GPU and
compiles into one graph.

A token dispatcher moves the assignments to the experts and back (MegaBlocks' and torchtitan's
shape): ``dispatch(tokens, expert ids, gates)`` gives the tokens of the experts this layer holds,
sorted by expert, and their counts; the layer runs its experts on them in one grouped GEMM;
``combine`` returns sum_j G_j E_j(x) per token (Eq. 5). The layer knows nothing of processes:
``TokenDispatcher`` keeps everything here; expert parallelism (parallel/ep.py) gives the layer a
slice of the routed experts and a dispatcher that exchanges tokens with the other slices' ranks, and
``reduce_stats`` sums routing statistics over the data-parallel group (identity by default), so the
RCL's expert means are the global mini-batch means whatever the world size.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from promoe_ds.config import ExpertSpec, MoEConfig
from promoe_ds.models.experts import ExpertGroup, run_experts


def routed_expert_layer(name: str) -> str:
    """For the name of a routed-expert parameter (``<layer>.routed_experts.w1``: the tensors split over
    expert-parallel ranks), its MoE layer's module name; "" for any other parameter."""
    layer, sep, _ = name.rpartition(".routed_experts.")
    return layer if sep else ""


def _atleast_f32(t: torch.Tensor) -> torch.Tensor:
    """Routing math in float32 (or float64 when the model is float64), never in bf16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def full_precision(fn):
    """Runs ``fn`` (routing math) with autocast off: autocast would do its cosine / RCL matmuls in bf16."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapped


class _GatherRows(torch.autograd.Function):
    """Row a of the result is ``t[idx[a] // slots]``, ``idx`` a permutation of ``len(t) * slots`` rows with
    inverse ``inv``. The backward gathers too: ``grad[inv]``, summed over each row's slots
    (index_select's own backward is an atomic scatter-add into a zeroed tensor)."""

    @staticmethod
    def forward(ctx, t, idx, inv, slots: int):
        ctx.save_for_backward(inv)
        ctx.slots = slots
        return t.index_select(0, idx // slots if slots > 1 else idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        g = grad.index_select(0, inv)
        return (g.view(-1, ctx.slots, g.shape[1]).sum(1) if ctx.slots > 1 else g), None, None, None


def expert_order(exp: torch.Tensor, tok: torch.Tensor | None, num: int):
    """(order, inv, counts): the assignments sorted by expert id (stable), for token choice (``tok`` None) the
    inverse permutation that the gathers of ``gather_sorted`` / ``combine_sorted`` use, and the assignments per
    expert id (``num`` of them). A counting sort: assignment a goes to place start[e] + (assignments to e before
    a), e = exp[a]; a scan over the one-hot ids instead of a radix sort over 64-bit keys plus its inverse."""
    # [num, A]: the scan runs along contiguous rows (F.one_hot would also check the ids on the host)
    onehot = (torch.arange(num, device=exp.device)[:, None] == exp).long()
    counts = onehot.sum(1)
    start = counts.cumsum(0) - counts
    place = start[exp] + (onehot.cumsum(1) - onehot).gather(0, exp[None]).squeeze(0)
    order = torch.empty_like(place).scatter_(0, place, torch.arange(place.numel(), device=place.device))
    return order, (place if tok is None else None), counts


def gather_sorted(x, tok, order, inv):
    """The assignments' tokens in expert order. ``tok`` None (token choice): assignment a is token
    a // slots, and the rows move by gathers only, forward and backward."""
    if tok is None:
        return _GatherRows.apply(x, order, inv, order.numel() // x.shape[0])
    return x.index_select(0, tok[order])


def combine_sorted(ys, x, tok, order, inv, gate):
    """sum_j G_j E_j(x) per token (Eq. 5) from the expert outputs ``ys`` (expert order), in x's dtype."""
    if tok is None:
        y = _GatherRows.apply(ys, inv, order, 1).to(x.dtype) * gate[:, None].to(x.dtype)
        return y.view(x.shape[0], -1, x.shape[1]).sum(1)
    return torch.zeros_like(x).index_add_(0, tok[order], ys.to(x.dtype) * gate[order, None].to(x.dtype))


class TokenDispatcher:
    """Assignments to experts on this process: ``dispatch`` sorts the assignments' tokens by expert id
    (``num_experts`` ids: the routed experts, then the unconditional ones), ``combine`` weights the expert
    outputs by their gates and sums them per token (Eq. 5)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x, tok, exp, gate):
        """-> (tokens sorted by expert, tokens per expert, what ``combine`` needs)."""
        order, inv, counts = expert_order(exp, tok, self.num_experts)
        return gather_sorted(x, tok, order, inv), counts, (x, tok, order, inv, gate)

    def combine(self, ys, ctx):
        return combine_sorted(ys, *ctx)


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@full_precision
def routing_contrastive_loss(x, member, prototypes, tau: float, reduce=identity_reduce):
    """Eq. 6. ``member`` [N, E] marks the routed experts of each conditional token (a token counts in
    the mean of each of its experts). m_i = mean of expert i's tokens; over the N_a experts that got
    tokens, L = -1/N_a sum_i log softmax_j(cos(p_i, m_j) / tau)[i]; fewer than 2 active -> 0.
    Written without data-dependent shapes (inactive experts are masked)."""
    x = _atleast_f32(x)
    member = member.to(x.dtype)
    stats = torch.cat([member.T @ x, member.sum(0)[:, None]], 1)  # per-expert token sums and counts
    stats = reduce(stats)  # global sums and counts over the data-parallel group
    sums, counts = stats[:, :-1], stats[:, -1]
    active = counts > 0
    means = sums / counts.clamp(min=1)[:, None]
    logits = F.normalize(_atleast_f32(prototypes), dim=-1) @ F.normalize(means, dim=-1).T / tau
    logits = logits.masked_fill(~active[None, :], float("-inf"))
    per_expert = torch.logsumexp(logits, dim=1) - logits.diagonal()
    n_active = active.sum()
    loss = torch.where(active, per_expert, torch.zeros_like(per_expert)).sum() / n_active.clamp(min=1)
    return torch.where(n_active >= 2, loss, loss * 0.0)


@full_precision
def load_balancing_loss(probs, member, routed_ok, reduce=identity_reduce):
    """Switch-style: E * sum_e f_e * P_e (f_e: fraction of assignments to e, P_e: mean router prob),
    over the routed (conditional) tokens."""
    probs = _atleast_f32(probs) * routed_ok[:, None]
    member = member.to(probs.dtype)
    stats = reduce(torch.cat([probs.sum(0), member.sum(0), routed_ok.sum()[None].to(probs.dtype)]))
    num = probs.shape[1]
    p_sum, counts, n_tok = stats[:num], stats[num:2 * num], stats[2 * num]
    return num * ((counts / counts.sum().clamp(min=1)) * (p_sum / n_tok.clamp(min=1))).sum()


class MoEMLP(nn.Module):
    def __init__(self, dim: int, moe: MoEConfig, *, mlp_ratio: float, layer_seed: int):
        super().__init__()
        spec: ExpertSpec = moe.spec()
        self.spec, self.router = spec, moe.router
        self.top_k, self.alpha, self.activation = spec.top_k, moe.alpha, moe.activation
        self.rcl_weight, self.rcl_tau, self.rcl_assign = moe.rcl_weight, moe.rcl_tau, moe.rcl_assign
        self.lb_weight, self.ec_capacity, self.ec_group = moe.lb_weight, moe.ec_capacity, moe.ec_group
        hidden = int(dim * (moe.expert_mlp_ratio or mlp_ratio / (1 + spec.shared)))
        self.routed_experts = ExpertGroup(spec.routed, dim, hidden, seed=layer_seed)
        self.shared_experts = (ExpertGroup(spec.shared, dim, hidden, seed=layer_seed + 1, shared=True)
                               if spec.shared else None)
        self.uncond_experts = ExpertGroup(spec.uncond, dim, hidden, seed=layer_seed + 2) if spec.uncond else None
        self.layer_seed = layer_seed
        if self.router.startswith("promoe"):
            self.prototypes = nn.Parameter(torch.empty(spec.routed, dim))
        else:
            self.gate = nn.Linear(dim, spec.routed, bias=False)
        self.reset_router()
        self.dispatcher = TokenDispatcher(spec.routed + spec.uncond)
        self.reduce_stats = identity_reduce

    @torch.no_grad()
    def reset_router(self) -> None:
        """Prototypes (or the gate of the softmax routers) N(0, 0.02), from the layer's own generator."""
        w = self.prototypes if self.router.startswith("promoe") else self.gate.weight
        g = torch.Generator().manual_seed(self.layer_seed + 3)
        w.copy_(torch.randn(w.shape, generator=g, device="cpu") * 0.02)

    def expert_groups(self) -> list[ExpertGroup]:
        """The experts ``dispatch`` sorts tokens for, in id order: the routed ones held here, the unconditional."""
        return [g for g in (self.routed_experts, self.uncond_experts) if g is not None]

    # ---- routing -------------------------------------------------------------------------------
    @full_precision
    def _scores(self, x):
        if self.router.startswith("promoe"):
            # Eq. 4 as (x . p) / |x| with unit prototypes: x enters the GEMM as it is; a normalised copy of x
            # would be written, kept for the backward and read again (bench/moe_block.py times both)
            x = _atleast_f32(x)
            protos = F.normalize(_atleast_f32(self.prototypes), dim=-1)
            z = self.alpha * (x @ protos.T) / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            if self.activation == "sigmoid":
                return z.sigmoid()
            return z.softmax(-1) if self.activation == "softmax" else z  # Eq. 2, identity by default
        return _atleast_f32(self.gate(x)).softmax(-1)

    def _choose_per_sample(self, scores, routed_ok, seq_len: int):
        """Expert choice within each conditional sample: every routed expert takes its top floor(S / E * k *
        capacity) of the sample's S tokens (ali-vilab/ProMoE's models_ProMoE_EC.py); returns (token, gate)
        [samples, quota, E]. Null-label samples (all tokens unconditional) take no part."""
        num = scores.shape[1]
        quota = max(1, min(int(seq_len / num * self.top_k * self.ec_capacity), seq_len))
        samples = routed_ok.view(-1, seq_len)[:, 0].nonzero().squeeze(1)  # the conditional samples
        gate, pos = scores.view(-1, seq_len, num)[samples].topk(quota, dim=1)
        return pos + samples[:, None, None] * seq_len, gate

    def _assign(self, scores, routed_ok, seq_len: int):
        """-> (token, expert id, gate) per assignment, and ``member`` [N, E_routed]: the routed experts
        of each conditional token (for RCL, load balancing and load statistics). Token choice gives
        every token the same number of slots, token-major: its token is None (assignment a is token
        a // slots), which lets the dispatch move rows by gathers only.
        Conditional routing (Sec. 4.1): a null-label token (routed_ok False) goes to every
        unconditional expert with gate 1 (ids E_routed, E_routed + 1, ...), never to a routed one."""
        n, num = scores.shape
        uncond = self.spec.uncond if self.uncond_experts is not None else 0
        if self.router in ("promoe", "tc"):  # token choice, Eq. 3: G = S on the top-k, no renormalisation
            gate, exp = scores.topk(self.top_k, dim=-1)
            member = torch.zeros_like(scores).scatter_(1, exp[:, :1] if self.rcl_assign == "top1" else exp, 1.0)
            member = member * routed_ok[:, None]
            if uncond:  # every token gets max(k, N_u) slots; unused slots carry gate 0
                slots = max(self.top_k, uncond)
                pad = slots - self.top_k
                exp = torch.cat([exp, exp[:, :1].expand(n, pad)], 1)
                gate = torch.cat([gate, torch.zeros_like(gate[:, :1]).expand(n, pad)], 1)
                j = torch.arange(slots, device=scores.device)
                exp_u = (num + j % uncond).expand(n, slots)
                gate_u = (j < uncond).to(gate.dtype).expand(n, slots)
                exp = torch.where(routed_ok[:, None], exp, exp_u)
                gate = torch.where(routed_ok[:, None], gate, gate_u)
            return None, exp.reshape(-1), gate.reshape(-1), member
        # expert choice: each routed expert takes a fixed quota of the conditional tokens
        if self.ec_group == "sample":
            tok, gate = self._choose_per_sample(scores, routed_ok, seq_len)
        else:
            n_routed = int(routed_ok.sum())
            quota = min(n_routed, max(1, round(self.ec_capacity * self.top_k * n_routed / num)))
            gate, tok = scores.masked_fill(~routed_ok[:, None], float("-inf")).topk(quota, dim=0)  # [quota, num]
        exp = torch.arange(num, device=scores.device).expand_as(tok).reshape(-1)
        tok, gate = tok.reshape(-1), gate.reshape(-1)
        member = torch.zeros_like(scores)
        member[tok, exp] = 1.0
        if uncond:
            tok_u = (~routed_ok).nonzero().squeeze(1).repeat_interleave(uncond)
            exp_u = num + torch.arange(uncond, device=scores.device).repeat(tok_u.shape[0] // uncond)
            tok, exp = torch.cat([tok, tok_u]), torch.cat([exp, exp_u])
            gate = torch.cat([gate, torch.ones_like(tok_u, dtype=gate.dtype)])
        return tok, exp, gate, member

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        """x [B, L, D]; cond [B] bool (False = null label). Returns (y, aux) where aux holds the
        routing losses (training only) and the per-expert token counts."""
        b, l, d = x.shape
        xf = x.reshape(b * l, d)
        out = self.shared_experts.forward_all(xf) if self.shared_experts is not None else torch.zeros_like(xf)
        routed_ok = (cond.repeat_interleave(l) if self.uncond_experts is not None
                     else torch.ones(b * l, dtype=torch.bool, device=x.device))  # no uncond experts: all routed
        scores = self._scores(xf)
        tok, exp, gate, member = self._assign(scores, routed_ok, l)
        xs, counts, ctx = self.dispatcher.dispatch(xf, tok, exp, gate)
        ys = run_experts(self.expert_groups(), xs, counts)  # one backend call for routed and unconditional
        out = out + self.dispatcher.combine(ys, ctx).to(out.dtype)

        aux = {}
        if self.training:
            zero = scores.sum() * 0.0
            aux["rcl"] = (routing_contrastive_loss(xf, member, self.prototypes, self.rcl_tau, self.reduce_stats)
                          if self.rcl_weight and self.router.startswith("promoe") else zero)
            probs = scores if self.router in ("tc", "ec") or self.activation == "softmax" else scores.softmax(-1)
            aux["lb"] = (load_balancing_loss(probs, member, routed_ok, self.reduce_stats)
                         if self.lb_weight else zero)
            aux["aux_loss"] = self.rcl_weight * aux["rcl"] + self.lb_weight * aux["lb"]
        aux["counts"] = member.detach().sum(0)
        return out.reshape(b, l, d), aux
