"""GPU-only checks (skipped on CPU machines; run on the device): expert backends agree with the loop
reference within bf16 tolerance, forward and backward, and the model trains under torch.compile."""
import pytest
import torch

from promoe_ds.config import MoEConfig, load_config
from promoe_ds.models.dit import build_model
from promoe_ds.models.experts import BACKENDS, ExpertGroup, megablocks_available
from promoe_ds.models.moe import MoEMLP

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return float((a.detach().double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", ["grouped", "megablocks"])
def test_expert_backend_matches_loop(backend):
    if backend == "megablocks" and not megablocks_available():
        pytest.skip("megablocks not installed")
    torch.manual_seed(0)
    g = ExpertGroup(12, 256, 512, seed=1).cuda()
    with torch.no_grad():
        g.b1.normal_()
        g.b2.normal_()
    counts = torch.tensor([0, 100, 3, 0, 517, 64, 1, 0, 250, 31, 7, 400], device="cuda")  # uneven, some empty
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    gy = torch.randn_like(x)

    def run(name, autocast):
        g.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = BACKENDS[name](xx, counts, g.w1, g.b1, g.w2, g.b2)
        y.float().backward(gy)
        return y.float(), xx.grad.clone(), g.w1.grad.clone(), g.b1.grad.clone(), g.b2.grad.clone()

    ref = run("loop", autocast=False)  # float32 reference
    for name in ("loop", backend):  # both bf16 paths land within bf16 tolerance of it
        for a, b in zip(run(name, autocast=True), ref):
            assert rel_err(a, b) < 1e-2, name


def test_promoe_layer_grouped_matches_loop():
    torch.manual_seed(0)
    cfg = MoEConfig(router="promoe", experts="E14A2S1U1", expert_mlp_ratio=2.0)
    layer = MoEMLP(256, cfg, mlp_ratio=4.0, layer_seed=0).cuda().train()
    x = torch.randn(8, 64, 256, device="cuda", requires_grad=True)
    cond = torch.tensor([True, False] * 4, device="cuda")
    res = {}
    for backend in ("loop", "grouped"):
        layer.routed_experts.backend = layer.uncond_experts.backend = backend
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = layer(x, cond)
        (y.float().square().mean() + aux["rcl"]).backward()
        res[backend] = (y.float(), x.grad.clone(), layer.prototypes.grad.clone())
    for a, b in zip(res["grouped"], res["loop"]):
        assert rel_err(a, b) < 2e-2


def test_train_step_under_compile():
    cfg = load_config(overrides=["model.preset=ProMoE-S", "model.depth=4"]).model
    model = build_model(cfg).cuda().train()
    model.set_expert_backend("grouped")
    fwd = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4, 32, 32, device="cuda")
    y = torch.tensor([1, 2, 1000, 4, 5, 1000, 7, 8], device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux = fwd(x, torch.full((8,), 500.0, device="cuda"), y)
            loss = (out[:, :4].float() - x).square().mean() + aux["aux_loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
