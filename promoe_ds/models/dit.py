"""The DiT backbone (Peebles & Xie 2023) with ProMoE MLPs in every other block.

adaLN-Zero blocks conditioned on c = t_emb + y_emb, fixed 2-D sin-cos position embedding, patch
embedding by a strided conv, attention through ``F.scaled_dot_product_attention`` (optional
qk-norm), and a final adaLN layer. The label table has ``num_classes + 1`` rows: row
``num_classes`` is the null (CFG) class. Label dropout is the trainer's job (it draws it with the
rest of the step's randomness); the model routes whatever labels it is given: null-label samples go
to the unconditional experts (conditional routing, Sec. 4.1 / Appendix B).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from promoe_ds.config import ModelConfig
from promoe_ds.models.experts import ExpertGroup, resolve_backend
from promoe_ds.models.moe import MoEMLP


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int, layout: str = "dit") -> np.ndarray:
    """Fixed 2-D sin-cos embedding [grid*grid, dim] of the row-major patch grid: half the channels encode the
    column coordinate, half the row. ``dit``: the column first, as DiT's and ProMoE's code build it (so their
    weights run unchanged); ``rows_first``: the row first, the layout of promoe-ds files without a record."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    halves = [one_axis(dim // 2, cols), one_axis(dim // 2, rows)]
    return np.concatenate(halves[::-1] if layout == "rows_first" else halves, axis=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, layer_seed: int):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.is_moe = moe
        self.mlp = (MoEMLP(d, cfg.moe, mlp_ratio=cfg.mlp_ratio, layer_seed=layer_seed) if moe
                    else Mlp(d, int(d * cfg.mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, cond):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        aux = None
        if self.is_moe:
            h, aux = self.mlp(h, cond)
        else:
            h = self.mlp(h)
        return x + gate_mlp.unsqueeze(1) * h, aux


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig, *, seed: int = 0):
        """Built and initialised from ``seed``; built on the meta device, the weights come with
        ``to_empty`` + ``init_weights`` (after expert parallelism took this rank's slice of the routed experts)."""
        super().__init__()
        self.seed = seed
        with torch.random.fork_rng(devices=[]):  # same dense init on every rank, global RNG untouched
            torch.manual_seed(seed)
            self._build(cfg, seed)

    def _build(self, cfg: ModelConfig, seed: int):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.num_classes = cfg.num_classes
        self.grad_checkpoint = False
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)  # row num_classes = null class
        grid = cfg.input_size // p
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(d, grid, cfg.pos_embed)).float()[None],
                             persistent=False)
        every = cfg.moe.every
        self.moe_blocks = ([i for i in range(cfg.depth) if i % every == every - 1]
                           if cfg.moe.router != "none" else [])
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, i in self.moe_blocks, layer_seed=seed * 7919 + 1000 * i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self._init_dense()

    def _init_dense(self):
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name, m in self.named_modules():
            if "gate" not in name.split(".")[-1]:  # router gates keep their N(0, 0.02) init
                xavier(m)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_weights(self) -> DiT:
        """The weights and buffers the constructor gives, for a model built on the meta device and moved with
        ``to_empty``: the draws of every layer's default init replayed in construction order from ``seed``
        (they set the RNG state the dense init starts from), the seeded router and expert inits, the dense init."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, ExpertGroup)):
                    m.reset_parameters()
            for layer in self.moe_layers():
                layer.reset_router()
            self._init_dense()
        grid = self.cfg.input_size // self.cfg.patch_size
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(self.cfg.hidden_size, grid, self.cfg.pos_embed))[None])
        return self

    def moe_layers(self) -> list[MoEMLP]:
        return [self.blocks[i].mlp for i in self.moe_blocks]

    def set_expert_backend(self, name: str, device: torch.device | str) -> str:
        """Resolves model.moe.backend for ``device`` (auto -> the fastest there), sets it on every
        routed and unconditional expert group and returns it."""
        layers = self.moe_layers()
        widths = (layers[0].routed_experts.dim, layers[0].routed_experts.hidden) if layers else ()
        backend = resolve_backend(name, torch.device(device), widths)
        for layer in layers:
            for group in (layer.routed_experts, layer.uncond_experts):
                if group is not None:
                    group.backend = backend
        return backend

    def unpatchify(self, x):
        c, p = self.out_channels, self.cfg.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    @torch.compiler.disable  # reads values back from the device; never traced
    def check_inputs(self, x, t, y):
        cfg = self.cfg
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"latents must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape [{x.shape[0]}], got {list(t.shape)} and {list(y.shape)}")
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be integers, got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
            raise ValueError(f"labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                             f"got min {int(y.min())} max {int(y.max())}")

    def forward(self, x, t, y):
        """x [B, C, H, W] latents, t [B] timesteps, y [B] labels (num_classes = null).
        Returns (out [B, out_channels, H, W], aux) with aux = {aux_loss, rcl, lb, counts[layers, E]}."""
        if not torch.compiler.is_compiling():  # the checks read values back from the device
            self.check_inputs(x, t, y)
        cond = y != self.num_classes
        # [B, L, D] row-major: a transposed view here would make torch.compile keep the whole residual
        # stream channels-first, and every per-token reduction (LayerNorm, Eq. 4 cosine) read with stride L
        h = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        auxes = []
        for blk in self.blocks:
            if self.grad_checkpoint and self.training:
                h, aux = checkpoint(blk, h, c, cond, use_reentrant=False)
            else:
                h, aux = blk(h, c, cond)
            if aux is not None:
                auxes.append(aux)
        out = self.unpatchify(self.final_layer(h, c))
        return out, collect_aux(auxes, out)


def collect_aux(auxes: list[dict], like: torch.Tensor) -> dict:
    """Sum the per-layer routing losses (paper: summed and added to the diffusion loss)."""
    zero = like.new_zeros((), dtype=torch.float32)
    out = {k: sum((a[k] for a in auxes if k in a), zero) for k in ("aux_loss", "rcl", "lb")}
    if auxes:
        out["counts"] = torch.stack([a["counts"] for a in auxes])
    return out


def build_model(cfg: ModelConfig, *, seed: int = 0) -> DiT:
    return DiT(cfg, seed=seed)


def compile_model(model: nn.Module, cuda_graphs: bool = False, dynamic: bool | None = None):
    """torch.compile for training and sampling. With the ``grouped`` experts the whole forward (MoE layers included)
    is one graph on one GPU. Inductor's mix-order reduction (on by default since torch 2.10) is turned
    off: it returns [D] gradients for [1, D] parameters (pytorch#178080, e.g. the bias of a 1-expert
    unconditional group on CUDA) and can silently corrupt adaLN-style gradients (pytorch#193061).
    ``cuda_graphs``: inductor records the compiled forward and backward as CUDA graphs and replays them,
    one launch each instead of one per kernel (CUDA only; static shapes, i.e. no expert parallelism).
    ``dynamic``: torch.compile's (None: a graph turns dynamic when a second shape arrives)."""
    options = ({"triton.mix_order_reduction": False}
               if "triton.mix_order_reduction" in torch._inductor.list_options() else {})
    if cuda_graphs:
        options["triton.cudagraphs"] = True
    return torch.compile(model, dynamic=dynamic, options=options)


def count_params(cfg: ModelConfig) -> dict:
    """Total parameters and those one conditional token activates (shared + top-k routed experts,
    not the unconditional or other routed experts), computed from shapes without building weights."""
    with torch.device("meta"):
        model = DiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.moe_layers():
        per_expert = sum(p[0].numel() for p in layer.routed_experts.parameters())
        inactive += per_expert * (layer.spec.routed - layer.spec.top_k)
        if layer.uncond_experts is not None:
            inactive += sum(p.numel() for p in layer.uncond_experts.parameters())
    return {"total_params": total, "activated_params": total - inactive,
            "moe_blocks": model.moe_blocks, "depth": cfg.depth}
