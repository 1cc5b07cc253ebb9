"""What a compiled train step keeps for its backward, with float32 weights under bf16 autocast and with
``train.bf16_weights`` (docs/performance.md): the bytes of the parameters and
of the tensors saved for the backward that are allocations of their own (a saved parameter costs nothing), by
dtype, and among them the expert weights with their bias columns appended (``[E, O, K + 8]``, the grouped
GEMMs' operands). Their sum is what is alive when the backward starts, before any gradient exists. CPU or GPU.

    python bench/saved_tensors.py                                   # a small ProMoE on the CPU
    python bench/saved_tensors.py --set model.preset=DiT-S model.depth=4
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from promoe_ds.config import load_config
from promoe_ds.models.dit import build_model, compile_model
from promoe_ds.optim import keep_bf16_weights

SMALL = ["model.preset=ProMoE-S", "model.depth=4", "model.hidden_size=256", "model.num_heads=4",
         "model.input_size=16", "model.num_classes=10"]


def account(cfg, device: torch.device, batch: int, bf16_weights: bool) -> dict[str, int]:
    torch._dynamo.reset()
    model = build_model(cfg, seed=0).train().to(device)
    model.set_expert_backend("grouped", device)
    if bf16_weights:
        keep_bf16_weights(model)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    operands = {(o, k + 8) for g in (m for m in model.modules() if hasattr(m, "gemm_operands"))
                for o, k in ((g.hidden, g.dim), (g.dim, g.hidden))}  # [experts, O, K + 8], any number of experts
    saved = Counter()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() in storages:
            saved["saved parameters (no new memory)"] += t.nbytes
        else:
            saved[f"saved {str(t.dtype).replace('torch.', '')}"] += t.nbytes
            if t.dim() == 3 and tuple(t.shape[1:]) in operands:
                saved["  of which expert weights with bias columns"] += t.nbytes
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g).to(device)
    fwd = compile_model(model)
    for _ in range(2):  # the second step runs the compiled graphs as they stay
        saved.clear()
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s),
              torch.autocast(device.type, dtype=torch.bfloat16)):
            out, aux = fwd(x, t, y)
            loss = out.float().square().mean() + aux["aux_loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
    params = Counter()
    for p in model.parameters():
        params[f"parameters {str(p.dtype).replace('torch.', '')}"] += p.nbytes
        if getattr(p, "master", p) is not p:
            params["float32 masters"] += p.master.nbytes
    new = sum(v for k, v in saved.items() if k.startswith("saved ") and "parameters" not in k)
    return {**params, **saved, "alive when the backward starts": sum(params.values()) + new}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model overrides (default: a small ProMoE)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = load_config(overrides=SMALL + args.set).model
    device = torch.device(args.device)
    cols = {"float32 weights": account(cfg, device, args.batch, False),
            "bf16_weights": account(cfg, device, args.batch, True)}
    rows = sorted(dict.fromkeys(k for c in cols.values() for k in c),  # parameters, saved tensors, the sum
                  key=lambda k: (k.startswith("alive"), not k.startswith(("parameters", "float32"))))
    print(f"{cfg.preset or 'custom'} depth {cfg.depth} hidden {cfg.hidden_size}, batch {args.batch}, {device}, MB")
    print("| | " + " | ".join(cols) + " | difference |\n|---|---|---|---|")
    for r in rows:
        a, b = (c.get(r, 0) / 2**20 for c in cols.values())
        print(f"| {r} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")


if __name__ == "__main__":
    main()
