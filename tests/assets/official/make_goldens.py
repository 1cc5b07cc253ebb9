"""Official-format checkpoints and the official models' outputs for tests/test_import.py.

Run once, outside the tests (which read only the files written here), with the authors' public code checked
out somewhere and its dependency timm (which imports torchvision) importable:

    PYTHONPATH=<dir with timm and torchvision> python tests/assets/official/make_goldens.py \\
        --promoe-repo <ali-vilab/ProMoE checkout> --dit-repo <facebookresearch/DiT checkout> --out tests/assets/official

The files here were written with ali-vilab/ProMoE at 5915b31e00f80262534baf552845fa21e03aced0 and
facebookresearch/DiT at ed81ce2229091fd4ecc9a223645f95cf379d582b (timm 1.0.31, torch 2.13 CPU, float32;
torchvision 0.28.0's CUDA operators unloaded, as timm needs only its Python modules here).

Small models with every kind of tensor of the released ones (MoE in every other block, 4 routed + 1 shared +
1 unconditional expert, 1000 classes: the public code sends label 1000 to the unconditional expert), their
weights drawn at random (the official init zeroes the adaLN and output layers):

- ``promoe.pth``: ali-vilab's ``ckpt_step_*.pth`` format (``model_state_dict``, ``ema_model_state_dict``,
  ``optimizer_state_dict`` of a fresh AdamW, ``step``) of models_ProMoE_TC.py; models_ProMoE_EC.py has the same
  tensors, so it is the EC checkpoint too;
- ``dense.pth``: the same format, models_DiT.py;
- ``DiT-tiny.pt``: facebookresearch/DiT's released format (a bare state dict) of its models.py;
- ``goldens.pt``: the inputs and each official model's outputs (``forward`` with conditional and null labels;
  CFG as each code samples: ProMoE's sample.py guides all channels of two passes, DiT's ``forward_with_cfg``).
"""
import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

CFG_SCALE = 1.5


class AttrDict(dict):
    """The public code reads its MoE config by attribute and unpacks it as keyword arguments."""
    __getattr__ = dict.__getitem__


def randomise(model: torch.nn.Module, seed: int) -> dict:
    """A state dict of random weights (1/sqrt(fan-in) scale, biases 0.1), pos_embed as the model built it."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if name == "pos_embed":
            state[name] = t.clone()
            continue
        std = 1 / math.sqrt(math.prod(t.shape[1:])) if t.dim() > 1 else 0.1
        state[name] = torch.randn(t.shape, generator=g) * std
    return state


def promoe_models(repo: Path):
    sys.path.insert(0, str(repo))
    from models.models_DiT import DiT as Dense
    from models.models_ProMoE_EC import DiT as EC
    from models.models_ProMoE_TC import DiT as TC

    size = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, num_heads=2, num_classes=1000)
    moe = AttrDict(num_routed_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                   load_balance_loss_coef=0, use_shared_expert=True, interleave=True, init_MoeMLP=False, top_k=1,
                   router_weight_mode="identity", routing_contrastive_lam=1, use_top_k_for_routing_contrastive=True,
                   routing_contrastive_temperature=0.07)
    return TC(depth=4, MoE_config=moe, **size), EC(depth=4, MoE_config=moe, **size), Dense(depth=2, **size)


def dit_model(repo: Path):
    spec = importlib.util.spec_from_file_location("facebookresearch_dit_models", repo / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2,
                      num_classes=1000, learn_sigma=True)


def ali_vilab_checkpoint(model, seed: int, step: int) -> dict:
    ema = randomise(model, seed + 1)
    state = randomise(model, seed)
    model.load_state_dict(state)
    return {"model_state_dict": state, "ema_model_state_dict": ema,
            "optimizer_state_dict": torch.optim.AdamW(model.parameters(), lr=1e-4).state_dict(), "step": step}


def promoe_cfg(model, x, t, y) -> torch.Tensor:
    """ProMoE's sample.py: a conditional and a null-label pass, every channel guided (then the first half kept)."""
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 1000))
    return (uncond + CFG_SCALE * (cond - uncond)).chunk(2, dim=1)[0]


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--promoe-repo", type=Path, required=True)
    p.add_argument("--dit-repo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    tc, ec, dense = promoe_models(args.promoe_repo)
    dit = dit_model(args.dit_repo)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g)
    y = torch.tensor([3, 1000, 999, 17, 1000, 500])  # 1000: the null class
    y_cond = torch.tensor([3, 7, 999, 17, 0, 500])
    t_flow = torch.tensor([10.0, 250.0, 500.0, 750.0, 990.0, 0.0])  # 1000 sigma
    t_ddpm = torch.tensor([0, 100, 999, 500, 250, 42])

    ckpt = ali_vilab_checkpoint(tc, 1, 123)
    torch.save(ckpt, args.out / "promoe.pth")
    golden = {"x": x, "y": y, "y_cond": y_cond, "t_flow": t_flow, "t_ddpm": t_ddpm, "cfg_scale": CFG_SCALE}
    for which, key in (("model", "model_state_dict"), ("ema", "ema_model_state_dict")):
        for name, model in (("tc", tc), ("ec", ec)):
            model.load_state_dict(ckpt[key])
            model.eval()
            golden[f"{name}_{which}"] = model(x, t_flow, y)
            golden[f"{name}_{which}_cfg"] = promoe_cfg(model, x, t_flow, y_cond)

    ckpt = ali_vilab_checkpoint(dense, 2, 456)
    torch.save(ckpt, args.out / "dense.pth")
    dense.load_state_dict(ckpt["ema_model_state_dict"])
    dense.eval()
    golden["dense_ema"] = dense(x, t_flow, y)
    golden["dense_ema_cfg"] = promoe_cfg(dense, x, t_flow, y_cond)

    state = randomise(dit, 3)
    torch.save(state, args.out / "DiT-tiny.pt")
    dit.load_state_dict(state)
    dit.eval()
    golden["dit"] = dit(x, t_ddpm, y)
    golden["dit_cfg"] = dit.forward_with_cfg(torch.cat([x[:3], x[:3]]), torch.cat([t_ddpm[:3], t_ddpm[:3]]),
                                             torch.cat([y_cond[:3], torch.full((3,), 1000)]), CFG_SCALE)
    torch.save(golden, args.out / "goldens.pt")
    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
