"""Both objectives train a tiny ProMoE on CPU; DDPM sampling through promoe_ds.sample; the paper's DDPM configs.

A tiny model trained for a few hundred CPU steps on toy latents lowers the loss for both objectives
(by a margin); sampling is deterministic with a fixed seed; CFG scale 1.0 is one pass per step.
Training is a plain single-process PyTorch loop (build_model + build_objective + AdamW on
``SyntheticSource`` latents, class dropout and the routing loss as in promoe_ds/train.py), so the
test measures the objective and the model, not DeepSpeed.
"""
import pytest
import torch

from promoe_ds.config import DataConfig, load_config
from promoe_ds.data import build_latent_source
from promoe_ds.diffusion import build_objective
from promoe_ds.models.dit import build_model
from promoe_ds.sample import class_labels, generate
from promoe_ds.train import diffusion_losses

from dist_utils import REPO, TINY
from test_sample import Counting  # the forward-pass counter of the sampling tests

BATCH, WINDOW = 16, 20
CASES = {"flow": ["objective.name=flow"],
         "ddpm": ["objective.name=ddpm"],
         "ddpm_ec": ["objective.name=ddpm", "model.moe.router=promoe_ec"]}
# Steps per case, seeds fixed: flow's velocity target keeps a large irreducible
# part, it needs the longer run (train window ratio 0.70, eval 1.80 -> 1.49 at 300 steps); DDPM's
# eps-MSE + VLB drops fast (ratio 0.26, eval 1.02 -> 0.21, both routers).
STEPS = {"flow": 300, "ddpm": 200, "ddpm_ec": 200}
TRAIN_MARGIN, EVAL_MARGIN = 0.8, 0.9


def tiny_cfg(case):
    # tiny_cpu.yaml: depth 4, hidden 64, 8x8x4 latents, 10 classes, ProMoE with 4 routed experts
    return load_config(TINY, CASES[case] + ["train.lr=1e-3"])


def eval_loss(model, objective, x0, y, draws):
    """The diffusion loss on a fixed batch with fixed noise and timesteps (no gradient)."""
    model.eval()
    with torch.no_grad():
        loss = objective.training_losses(lambda xt, tt: model(xt, tt, y)[0], x0, draws)["loss"].item()
    model.train()
    return loss


def train(case):
    """(model, objective, per-step diffusion losses, eval loss before, eval loss after)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(case)
    m = cfg.model
    shape = (m.in_channels, m.input_size, m.input_size)
    model = build_model(m, seed=0)
    objective = build_objective(cfg.objective)
    data = build_latent_source(DataConfig(source="synthetic"), latent_shape=shape, num_classes=m.num_classes,
                               micro_batch=BATCH, rank=0, world_size=1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    eval_data = build_latent_source(DataConfig(source="synthetic"), latent_shape=shape, num_classes=m.num_classes,
                                    micro_batch=64, rank=0, world_size=1, seed=123)
    ex0, ey = eval_data.next_batch()
    edraws = objective.draw(64, shape, torch.Generator().manual_seed(123))
    before = eval_loss(model, objective, ex0, ey, edraws)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS[case]):
        x0, y = data.next_batch()
        draws = objective.draw(BATCH, shape, g)
        drop = torch.rand(BATCH, generator=g) < cfg.objective.class_dropout
        y = torch.where(drop, torch.full_like(y, m.num_classes), y)  # null label: unconditional expert
        out, aux = diffusion_losses(objective, model, x0, y, draws)
        opt.zero_grad(set_to_none=True)
        (out["loss"] + aux["aux_loss"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        losses.append(out["loss"].item())
    return model, objective, losses, before, eval_loss(model, objective, ex0, ey, edraws)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # Adam's tiny second moments are denormals: 2x faster on CPU
    torch.set_num_threads(min(threads, 2))
    yield {}
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def get(trained, case):
    if case not in trained:
        trained[case] = train(case)
    return trained[case]


@pytest.mark.parametrize("case", list(CASES))
def test_training_lowers_the_loss(trained, case):
    model, objective, losses, before, after = get(trained, case)
    assert objective.name == CASES[case][0].split("=")[1]
    assert {layer.router for layer in model.moe_layers()} == {"promoe_ec" if case == "ddpm_ec" else "promoe"}
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    print(f"{case}: train loss first {WINDOW} {first:.4f} last {WINDOW} {last:.4f}; eval {before:.4f} -> {after:.4f}")
    assert last < TRAIN_MARGIN * first, (first, last)
    assert after < EVAL_MARGIN * before, (before, after)


def test_ddpm_sampling_deterministic_and_one_pass_at_scale_one(trained):
    model, objective, *_ = get(trained, "ddpm")
    model.eval()
    counted = Counting(model)
    idx = [0, 1, 2, 3]
    y = class_labels(idx, None, 10, 7)
    a = generate(counted, objective, idx, y, steps=5, cfg_scale=1.0, seed=7)
    assert counted.calls == [(4, 0)] * 5  # 5 respaced steps of 1000: one conditional pass each
    b = generate(model, objective, idx, y, steps=5, cfg_scale=1.0, seed=7)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.allclose(a, generate(model, objective, idx, y, steps=5, cfg_scale=1.0, seed=8))
    # guided: still one (doubled) pass per step, and deterministic
    counted.calls.clear()
    c = generate(counted, objective, idx, y, steps=5, cfg_scale=4.0, seed=7)
    assert counted.calls == [(8, 4)] * 5
    assert torch.equal(c, generate(model, objective, idx, y, steps=5, cfg_scale=4.0, seed=7))
    assert not torch.allclose(a, c)
    # sample i depends on (seed, i) only: the same sample alone or in a batch (up to float32 differences of
    # batch-size-dependent kernels, ~1e-5 relative; another sample's noise would differ by O(1))
    torch.testing.assert_close(generate(model, objective, [2], y[2:3], steps=5, cfg_scale=1.0, seed=7), a[2:3],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,rcl", [("b", 10.0), ("l", 1.0), ("xl", 1.0)])
def test_paper_ddpm_configs(size, rcl):
    cfg = load_config(REPO / "configs" / f"promoe_{size}_ddpm.yaml")
    assert cfg.objective.name == "ddpm" and cfg.objective.diffusion_steps == 1000
    assert cfg.model.moe.rcl_weight == rcl
    assert cfg.model.moe.router == "promoe" and cfg.model.learn_sigma
    assert cfg.train.global_batch == 256 and cfg.train.lr == 1e-4 and cfg.data.source == "wds"
    assert cfg.model.hidden_size == {"b": 768, "l": 1024, "xl": 1152}[size]
    ec = load_config(REPO / "configs" / f"promoe_{size}_ddpm.yaml", ["model.moe.router=promoe_ec"])
    assert ec.model.moe.router == "promoe_ec"
    assert "# router: promoe_ec" in (REPO / "configs" / f"promoe_{size}_ddpm.yaml").read_text()
