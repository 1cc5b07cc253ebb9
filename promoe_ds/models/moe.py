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

Distribution is injected, not imported: ``dispatch`` computes the routed experts for a list of
(token, expert, gate) assignments (local by default; all-to-all under expert parallelism) and
``reduce_stats`` sums routing statistics over the data-parallel group (identity by default), so the
RCL's expert means are the global mini-batch means whatever the world size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from promoe_ds.config import ExpertSpec, MoEConfig
from promoe_ds.models.experts import ExpertGroup


def _atleast_f32(t: torch.Tensor) -> torch.Tensor:
    """Routing math in float32 (or float64 when the model is float64), never in bf16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def local_dispatch(experts: ExpertGroup, x, tok, exp, gate):
    """sum_j G_j E_j(x) (Eq. 5, conditional branch) for assignments (tok[i] -> exp[i], gate[i])."""
    order = torch.argsort(exp, stable=True)
    counts = torch.bincount(exp, minlength=experts.num)
    tok = tok[order]
    # index_select / index_add (not x[tok]): their backward is an atomic add, not a sort-based scatter
    ys = experts(x.index_select(0, tok), counts) * gate[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tok, ys.to(x.dtype))


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def routing_contrastive_loss(x, tok, exp, prototypes, tau: float, reduce=identity_reduce):
    """Eq. 6: m_i = mean of the tokens assigned to expert i; for the N_a experts with tokens,
    L = -1/N_a sum_i log softmax_j(cos(p_i, m_j) / tau)[i]. Fewer than 2 active experts -> 0."""
    num, dim = prototypes.shape
    x = _atleast_f32(x)
    assign = torch.zeros(x.shape[0], num, device=x.device, dtype=x.dtype)
    assign[tok, exp] = 1.0  # (token, expert) pairs are unique for top-k and expert choice
    stats = torch.cat([assign.T @ x, assign.sum(0)[:, None]], 1)  # per-expert token sums and counts
    stats = reduce(stats)  # global sums and counts over the data-parallel group
    sums, counts = stats[:, :dim], stats[:, dim]
    active = counts > 0
    if int(active.sum()) < 2:
        return prototypes.sum() * 0.0
    means = sums[active] / counts[active, None]
    logits = F.normalize(_atleast_f32(prototypes[active]), dim=-1) @ F.normalize(means, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def load_balancing_loss(probs, exp, num: int, reduce=identity_reduce):
    """Switch-style: num * sum_e f_e * P_e (f_e: fraction of assignments to e, P_e: mean router prob)."""
    probs = _atleast_f32(probs)
    stats = torch.cat([probs.sum(0), torch.bincount(exp, minlength=num).to(probs.dtype),
                       probs.new_tensor([probs.shape[0]])])
    stats = reduce(stats)
    p_sum, counts, n_tok = stats[:num], stats[num:2 * num], stats[2 * num]
    return num * ((counts / counts.sum().clamp(min=1)) * (p_sum / n_tok.clamp(min=1))).sum()


class MoEMLP(nn.Module):
    def __init__(self, dim: int, moe: MoEConfig, *, mlp_ratio: float, layer_seed: int,
                 ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        spec: ExpertSpec = moe.spec()
        self.spec, self.router = spec, moe.router
        self.top_k, self.alpha, self.activation = spec.top_k, moe.alpha, moe.activation
        self.rcl_weight, self.rcl_tau, self.rcl_assign = moe.rcl_weight, moe.rcl_tau, moe.rcl_assign
        self.lb_weight, self.ec_capacity = moe.lb_weight, moe.ec_capacity
        hidden = int(dim * (moe.expert_mlp_ratio or mlp_ratio / (1 + spec.shared)))
        if spec.routed % ep_size:
            raise ValueError(f"{spec.routed} routed experts cannot be split over ep_size={ep_size}")
        n_local = spec.routed // ep_size
        self.routed_experts = ExpertGroup(n_local, dim, hidden, first_id=ep_rank * n_local, seed=layer_seed)
        self.shared_experts = ExpertGroup(spec.shared, dim, hidden, seed=layer_seed + 1) if spec.shared else None
        self.uncond_experts = ExpertGroup(spec.uncond, dim, hidden, seed=layer_seed + 2) if spec.uncond else None
        if self.router.startswith("promoe"):
            self.prototypes = nn.Parameter(torch.randn(spec.routed, dim,
                                                       generator=torch.Generator().manual_seed(layer_seed + 3)) * 0.02)
        else:
            self.gate = nn.Linear(dim, spec.routed, bias=False)
            with torch.no_grad():
                g = torch.Generator().manual_seed(layer_seed + 3)
                self.gate.weight.copy_(torch.randn(self.gate.weight.shape, generator=g) * 0.02)
        self.dispatch = local_dispatch
        self.reduce_stats = identity_reduce

    # ---- routing -------------------------------------------------------------------------------
    def _scores(self, x):
        if self.router.startswith("promoe"):
            z = self.alpha * F.normalize(_atleast_f32(x), dim=-1) @ F.normalize(_atleast_f32(self.prototypes), dim=-1).T  # Eq. 4
            if self.activation == "sigmoid":
                return z.sigmoid()
            return z.softmax(-1) if self.activation == "softmax" else z  # Eq. 2, identity by default
        return _atleast_f32(self.gate(x)).softmax(-1)

    def _assign(self, scores):
        """-> (token index, expert id, gate) per assignment."""
        n, num = scores.shape
        if self.router in ("promoe", "tc"):  # token choice, Eq. 3: G = S on the top-k, no renormalisation
            gate, exp = scores.topk(self.top_k, dim=-1)
            tok = torch.arange(n, device=scores.device).repeat_interleave(self.top_k)
            return tok, exp.reshape(-1), gate.reshape(-1)
        quota = min(n, max(1, round(self.ec_capacity * self.top_k * n / num)))  # expert choice
        gate, tok = scores.topk(quota, dim=0)  # [quota, num]
        exp = torch.arange(num, device=scores.device).repeat(quota)
        return tok.reshape(-1), exp, gate.reshape(-1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        """x [B, L, D]; cond [B] bool (False = null label). Returns (y, aux) where aux holds the
        routing losses (training only) and the per-expert token counts."""
        b, l, d = x.shape
        xf = x.reshape(b * l, d)
        out = self.shared_experts.forward_all(xf) if self.shared_experts is not None else torch.zeros_like(xf)
        tok_cond = cond.repeat_interleave(l)
        if self.uncond_experts is not None:  # conditional routing: hard, gate 1 (Eq. 5, lower branch)
            # run even on zero tokens: every rank must produce a gradient for every parameter, in the same
            # order, or DeepSpeed's gradient buckets differ between ranks
            idx_u = (~tok_cond).nonzero().squeeze(1)
            out = out.index_add(0, idx_u, self.uncond_experts.forward_all(xf.index_select(0, idx_u)).to(out.dtype))
            idx_c = tok_cond.nonzero().squeeze(1)
        else:  # no unconditional experts: every token is routed
            idx_c = torch.arange(b * l, device=x.device)
        xc = xf.index_select(0, idx_c)
        scores = self._scores(xc)
        tok, exp, gate = self._assign(scores)
        yc = self.dispatch(self.routed_experts, xc, tok, exp, gate)
        out = out.index_add(0, idx_c, yc.to(out.dtype))

        aux = {}
        if self.training:
            zero = scores.sum() * 0.0
            if self.rcl_weight and self.router.startswith("promoe"):
                rtok, rexp = tok, exp
                if self.rcl_assign == "top1" and self.router == "promoe":
                    rtok, rexp = tok[::self.top_k], exp[::self.top_k]
                aux["rcl"] = routing_contrastive_loss(xc, rtok, rexp, self.prototypes, self.rcl_tau, self.reduce_stats)
            else:
                aux["rcl"] = zero
            aux["lb"] = (load_balancing_loss(scores if self.router != "promoe" or self.activation == "softmax"
                                             else scores.softmax(-1), exp, self.spec.routed, self.reduce_stats)
                         if self.lb_weight else zero)
            aux["aux_loss"] = self.rcl_weight * aux["rcl"] + self.lb_weight * aux["lb"]
        aux["counts"] = torch.bincount(exp.detach(), minlength=self.spec.routed)
        return out.reshape(b, l, d), aux
