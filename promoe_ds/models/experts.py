"""Expert weights and the backends that compute them.

``ExpertGroup`` stores E expert MLPs ``Linear(D, H) -> GELU(tanh) -> Linear(H, D)`` as stacked
tensors (``w1 [E, H, D]``, ``b1 [E, H]``, ``w2 [E, D, H]``, ``b2 [E, D]``, nn.Linear layout per
expert), so every backend reads the same parameters:

- ``loop``: a Python loop over experts (the reference; any device).
- ``grouped``: ``torch._grouped_mm`` over the token groups, no loop and no host sync (CUDA; CPU too,
  where torch.compile needs bf16).
- ``megablocks``: MegaBlocks' grouped GEMM (``megablocks.grouped_gemm_util``), when installed.
- ``auto``: the fastest one available for the tensors at hand.

Tokens reach ``forward`` already sorted by expert, with ``counts[e]`` tokens for expert e.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from promoe_ds.config import ConfigError


def _gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


@torch.compiler.disable  # reads counts on the host: eager under torch.compile
def loop_experts(x, counts, w1, b1, w2, b2):
    """Reference: one small MLP per expert over its contiguous slice of tokens."""
    outs = []
    for e, xs in enumerate(torch.split(x, counts.tolist())):
        outs.append(F.linear(_gelu(F.linear(xs, w1[e], b1[e])), w2[e], b2[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, K + 8]: a ones column (the bias input) and 7 zero columns (rows stay 16-byte aligned)."""
    return torch.cat([a, a.new_ones(a.shape[0], 1), a.new_zeros(a.shape[0], 7)], 1)


def _with_bias(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E, O, K] weights, [E, O] biases -> [E, O, K + 8]: the bias column, then 7 zero columns."""
    return torch.cat([w, b[..., None], w.new_zeros(*w.shape[:2], 7)], 2)


def _grouped_mlp(gmm, x, w1, b1, w2, b2):
    """Expert MLPs as two grouped GEMMs ``gmm(tokens, w)`` in the autocast dtype. Each bias rides in its GEMM
    as one more input column, ``[x, 1] @ [W, b]^T``: no per-token bias gather (whose backward is a scatter
    into E rows) and no extra GEMM; the bias gradient comes out of the weight-gradient GEMM. Under
    torch.compile the extra columns fuse into the casts that make the bf16 operands anyway."""
    if x.shape[0] == 0:  # no token for these experts (an expert-parallel rank, a batch without null label):
        # grouped kernels reject an empty problem; the output stays tied to the weights (zero gradients), so
        # every rank produces the same gradients for DeepSpeed to reduce
        return x.new_zeros(0, w2.shape[1]) + sum(t[:0].sum() for t in (w1, b1, w2, b2))
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    with torch.autocast(dev, enabled=False):
        h = gmm(_with_ones(x), _with_bias(w1, b1))
        return gmm(_with_ones(_gelu(h)), _with_bias(w2, b2))


def grouped_experts(x, counts, w1, b1, w2, b2):
    """torch._grouped_mm: one kernel per GEMM for all experts (offs = cumulative group ends)."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return _grouped_mlp(lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs), x, w1, b1, w2, b2)


@torch.compiler.disable  # batch sizes on the host: eager under torch.compile
def megablocks_experts(x, counts, w1, b1, w2, b2):
    """MegaBlocks' grouped GEMM (grouped_gemm's CUTLASS kernel, bf16 only); batch sizes are a CPU int64
    tensor in its API."""
    from megablocks import grouped_gemm_util as gg  # optional GPU dependency

    if not (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16):
        raise ValueError("expert backend 'megablocks' runs in bf16 only: "
                         "use bf16 autocast (train.precision=bf16) or grouped")
    sizes = counts.to("cpu", torch.int64)
    return _grouped_mlp(lambda a, w: gg.ops.gmm(a.contiguous(), w, sizes, trans_b=True), x, w1, b1, w2, b2)


def megablocks_available() -> bool:
    try:
        from megablocks import grouped_gemm_util as gg
    except ImportError:
        return False
    return bool(getattr(gg, "grouped_gemm_is_available", lambda: False)())


BACKENDS = {"loop": loop_experts, "grouped": grouped_experts, "megablocks": megablocks_experts}


def resolve_backend(name: str, device: torch.device, widths: tuple[int, ...] = ()) -> str:
    """model.moe.backend for ``device`` and the experts' widths (model and hidden dims).
    'auto' -> grouped on CUDA (torch grouped GEMM), loop elsewhere; explicit names are checked.
    Grouped GEMMs need 16-byte aligned rows: widths that are multiples of 8 (bf16)."""
    aligned = all(w % 8 == 0 for w in widths)
    if name == "auto":
        return "grouped" if device.type == "cuda" and hasattr(torch, "_grouped_mm") and aligned else "loop"
    if name == "grouped" and not hasattr(torch, "_grouped_mm"):
        raise ConfigError("model.moe.backend: 'grouped' needs torch._grouped_mm "
                          f"(torch >= 2.8, this is {torch.__version__})")
    if name == "megablocks" and device.type != "cuda":
        raise ConfigError(f"model.moe.backend: 'megablocks' needs a CUDA device (got {device}); "
                          "use grouped, loop or auto")
    if name == "megablocks" and not megablocks_available():
        raise ConfigError("model.moe.backend: 'megablocks' is not installed: see README (GPU install) or use grouped")
    if name != "loop" and not aligned:
        raise ConfigError(f"model.moe.backend: {name!r} needs expert widths that are multiples of 8, got {widths}; "
                          "use loop or auto")
    return name


def run_experts(groups: list[ExpertGroup], x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Experts of several groups (routed + unconditional) in one backend call: x sorted by expert,
    counts over the groups' experts in order. Uses the first group's backend. ``grouped`` traces into
    the compiled graph; ``loop`` and ``megablocks`` read sizes on the host and run eagerly."""
    names = ("w1", "b1", "w2", "b2")
    if len(groups) == 1:
        params = [getattr(groups[0], n) for n in names]
    else:
        params = [torch.cat([getattr(g, n) for g in groups]) for n in names]
    return BACKENDS[groups[0].backend](x, counts, *params)


class ExpertGroup(nn.Module):
    """E expert MLPs as stacked tensors. ``first_id`` is the global id of the first expert held here
    (expert parallelism holds a slice); initialisation is seeded per (seed, global id), so a model
    built with any expert-parallel layout starts from the same weights."""

    def __init__(self, num: int, dim: int, hidden: int, *, first_id: int = 0, seed: int = 0, shared: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num, self.dim, self.hidden, self.first_id, self.seed = num, dim, hidden, first_id, seed
        self.shared = shared  # computed by forward_all (every token), not by a backend
        self.w1 = nn.Parameter(torch.empty(num, hidden, dim, device=device))
        self.b1 = nn.Parameter(torch.zeros(num, hidden, device=device))
        self.w2 = nn.Parameter(torch.empty(num, dim, hidden, device=device))
        self.b2 = nn.Parameter(torch.zeros(num, dim, device=device))
        self.backend = "loop"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # xavier-uniform weights, zero biases (DiT's init of every Linear), one generator per expert
        if self.w1.is_meta:
            return
        for i in range(self.num):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first_id + i)
            for w in (self.w1, self.w2):
                bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
                w[i].copy_(torch.rand(w.shape[1:], generator=g) * 2 * bound - bound)
        self.b1.zero_()
        self.b2.zero_()

    def shard(self, index: int, count: int) -> ExpertGroup:
        """Experts ``index * n .. (index + 1) * n - 1`` of this group (n = num / count) as a group of their own:
        their current values, or nothing on the meta device (``reset_parameters`` gives them the values they
        would have had here)."""
        n = self.num // count
        part = ExpertGroup(n, self.dim, self.hidden, first_id=self.first_id + index * n, seed=self.seed,
                           shared=self.shared, device=self.w1.device)
        part.backend = self.backend
        if not self.w1.is_meta:
            with torch.no_grad():
                for name in ("w1", "b1", "w2", "b2"):
                    getattr(part, name).copy_(getattr(self, name)[index * n:(index + 1) * n])
        return part

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every expert applied to every token (shared experts, Eq. 5): the E experts as one
        MLP of width E*H, sum_e W2_e gelu(W1_e x + b1_e) + b2_e, in two plain GEMMs."""
        w1 = self.w1.reshape(self.num * self.hidden, self.dim)
        w2 = self.w2.permute(1, 0, 2).reshape(self.dim, self.num * self.hidden)
        # keepdim: a [1, D] bias keeps its shape in the backward (torch.compile returns [D] otherwise)
        return F.linear(_gelu(F.linear(x, w1, self.b1.reshape(-1))), w2) + self.b2.sum(0, keepdim=True)

    def gemm_operands(self) -> list[nn.Parameter]:
        """The tensors that enter bf16 GEMMs under autocast: all four, but a shared group's output bias, which
        forward_all adds in float32."""
        return [self.w1, self.b1, self.w2] + ([] if self.shared else [self.b2])

    def extra_repr(self) -> str:
        return f"num={self.num}, dim={self.dim}, hidden={self.hidden}, first_id={self.first_id}"
