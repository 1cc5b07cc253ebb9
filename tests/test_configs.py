"""The configs a user starts from: each passes the trainer's preflight and DeepSpeed config for the
world it is written for, carries the fast settings docs/performance.md recommends for it, and the two
one-node ProMoE-XL configs (torchrun, Slurm) describe the same run."""
import dataclasses
from pathlib import Path

import pytest
import torch

from promoe_ds.config import load_config
from promoe_ds.ds_config import build_ds_config
from promoe_ds.train import preflight

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,world", [("configs/promoe_xl_1gpu.yaml", 1), ("configs/promoe_xl.yaml", 8),
                                        ("configs/promoe_b_ddpm.yaml", 8), ("configs/promoe_l_ddpm.yaml", 8),
                                        ("configs/promoe_xl_ddpm.yaml", 8), ("slurm/configs/promoe_xl_1node.yaml", 8)])
def test_gpu_configs_carry_the_fast_single_node_settings(name, world):
    cfg = load_config(str(REPO / name), ["data.source=synthetic"])
    preflight(cfg, world, torch.device("cuda"))
    ds = build_ds_config(cfg.train, world, on_gpu=True)  # refuses fused_ema without ZeRO-0, and the like
    t = cfg.train
    assert ds["gradient_accumulation_steps"] == 1 and ds["torch_autocast"]["enabled"]
    assert t.zero_stage == 0 and t.compile and t.fused_ema and t.compile_cache == "auto"
    assert t.cuda_graphs == (t.ep_size == 1)  # the graphs need ep_size 1; used wherever allowed
    assert cfg.model.moe.backend == "auto" and cfg.data.path == "data/imagenet256-latents"
    assert not (t.bf16_weights or t.grad_checkpoint or t.profile_at)  # optional / memory / experiment only
    assert t.steps == 500_000  # the paper's main-table budget


def test_one_node_promoe_xl_configs_agree():
    torchrun = load_config(str(REPO / "configs/promoe_xl.yaml"), [])
    slurm = load_config(str(REPO / "slurm/configs/promoe_xl_1node.yaml"), [])
    assert slurm.wandb.mode == "offline"  # compute nodes often have no network
    assert dataclasses.replace(slurm, wandb=torchrun.wandb) == torchrun
