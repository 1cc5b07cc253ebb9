"""GPU-only checks (skipped on CPU machines; run on the device): expert backends agree with the loop
reference within bf16 tolerance, forward and backward. The layer-level grouped-vs-loop check and the
compiled-model check run on both devices in tests/test_model.py (their "cuda" cases carry the gpu mark)."""
import pytest
import torch
from test_model import rel_err

from promoe_ds.models.experts import BACKENDS, ExpertGroup, megablocks_available

pytestmark = pytest.mark.gpu


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
    # an expert-parallel rank may receive no token at all: empty output, zero weight gradients
    empty = torch.zeros(0, 256, device="cuda", requires_grad=True)
    g.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = BACKENDS[backend](empty, torch.zeros_like(counts), g.w1, g.b1, g.w2, g.b2)
    assert y.shape == (0, 256)
    y.float().backward(torch.ones(0, 256, device="cuda"))  # a materialised gradient, as the model's
    assert all(p.grad is not None and not p.grad.any() for p in g.parameters())


@pytest.mark.parametrize("marked", [False, True], ids=["dense", "routed-experts-marked"])
def test_zero0_clip_and_skip_never_wait_for_the_gpu(marked):
    """The ZeRO-0 update (global norm, clip and skip inside the fused AdamW) queues without a host sync,
    with or without routed-expert gradients (an empty group's zero is made on the device: a host tensor
    would be a synchronising copy), and matches clip_grad_norm_ + AdamW; a non-finite loss flag leaves the
    weights as they were."""
    from promoe_ds.parallel.ep import global_grad_norm
    from promoe_ds.train import clip_in_adamw

    torch.manual_seed(0)
    shapes = [(64, 32), (64,), (4, 128, 32), (4, 32)]
    ref = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") * 3 for s in shapes]  # norm > 0.5: clipping is active

    def make():
        params = [torch.nn.Parameter(r.clone()) for r in ref]
        for p, g in zip(params, grads):
            p.grad = g.clone()
            p.allreduce = not (marked and p.dim() == 3)  # DeepSpeed's mark of routed-expert parameters
        return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, fused=True)

    expected, opt = make()
    torch.nn.utils.clip_grad_norm_(expected, 0.5)
    opt.step()

    params, opt = make()
    ok = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        applied = clip_in_adamw(opt, global_grad_norm(params, 1), 0.5, ok)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert applied.item() == 1
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e)

    params, opt = make()
    assert clip_in_adamw(opt, global_grad_norm(params, 1), 0.5, torch.zeros((), device="cuda")).item() == 0
    opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(p, r)


def test_cuda_graphs_replay_the_compiled_step():
    """train.cuda_graphs: inductor records the compiled forward and backward as CUDA graphs (none skipped)
    and replays them; four AdamW steps give the losses and weights of the compiled step without graphs."""
    from test_model import tiny_cfg
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from promoe_ds.models.dit import build_model, compile_model

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g).cuda(), (torch.rand(4, generator=g) * 1000).cuda()
    y = torch.tensor([1, 10, 3, 4], device="cuda")  # 10: the null label (conditional routing)

    def train(cuda_graphs: bool):
        torch._dynamo.reset()
        counters.clear()
        model = build_model(tiny_cfg()).train().cuda()
        model.set_expert_backend("grouped", torch.device("cuda"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        fwd, losses = compile_model(model, cuda_graphs=cuda_graphs), []
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, aux = fwd(x, t, y)
                loss = out.float().square().mean() + aux["aux_loss"]
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    losses, weights = train(False)
    losses_g, weights_g = train(True)
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert counters["inductor"]["cudagraph_skips"] == 0 and manager is not None and manager.roots
    assert losses_g == losses
    for a, b in zip(weights_g, weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adamw_ema_in_one_pass_matches_fused_adamw_and_ema_without_a_sync():
    """train.fused_ema on CUDA (inductor's Triton kernels): three steps with clipping equal torch's fused AdamW
    followed by the EMA's own pass, and once compiled a step queues without waiting for the GPU."""
    from promoe_ds.optim import AdamWEMA

    torch.manual_seed(0)
    shapes = [(64, 32), (64,), (4, 128, 32), (4, 32)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") * 3 for s in shapes] for _ in range(3)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)

    def run(ours: bool):
        params = [torch.nn.Parameter(r.clone()) for r in init]
        emas = {p: p.detach().clone() for p in params[:3]}  # one parameter without an EMA on this rank
        opt = AdamWEMA(params, emas, 0.99, **hyper) if ours else torch.optim.AdamW(params, **hyper, fused=True)
        for i, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.grad_scale = torch.full((), 1.0 + i, device="cuda")
            if i and ours:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if not ours:
                torch._foreach_lerp_(list(emas.values()), params[:3], 0.01)
        return params, list(emas.values())

    (params, emas), (ref_params, ref_emas) = run(True), run(False)
    for a, b in zip(params + emas, ref_params + ref_emas):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(params[0], init[0])


def test_compiled_sampling_matches_eager():
    """``promoe-ds sample``'s default on CUDA: the model under torch.compile with static shapes gives the eager
    sampler's latents within bf16 tolerance; one graph per batch shape (a rank's smaller last batch adds one),
    none per step (the timestep is a tensor input)."""
    from test_model import tiny_cfg
    from torch._dynamo.utils import counters

    from promoe_ds.config import load_config
    from promoe_ds.diffusion import build_objective
    from promoe_ds.models.dit import build_model, compile_model
    from promoe_ds.sample import class_labels, generate, initial_noise

    model = build_model(tiny_cfg(), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero and output layers: a non-zero velocity
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.set_expert_backend("grouped", torch.device("cuda"))
    model = model.cuda().eval()
    objective = build_objective(load_config(None, {"objective": {"name": "flow", "shift": 3.0}}).objective)
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(model, dynamic=False)
    for idx in ([0, 1, 2, 3, 4], [5, 6]):  # a full batch, then a smaller last one
        y = class_labels(idx, None, 10, seed=0)
        eager = generate(model, objective, idx, y, steps=8, cfg_scale=1.5, seed=0, bf16=True)
        fast = generate(compiled, objective, idx, y, steps=8, cfg_scale=1.5, seed=0, bf16=True)
        assert rel_err(eager, initial_noise(model.cfg, idx, 0).cuda()) > 0.1  # the model moved the latents
        assert rel_err(fast, eager) < 1e-2
    assert counters["stats"]["unique_graphs"] == 2
