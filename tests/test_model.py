"""Model core: config, presets/parameter counts, and the ProMoE layer against Algorithm 1."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from promoe_ds.cli import main as cli_main
from promoe_ds.config import ConfigError, ExpertSpec, MoEConfig, load_config, validate
from promoe_ds.models.dit import build_model, count_params
from promoe_ds.models.experts import BACKENDS, ExpertGroup
from promoe_ds.models.moe import MoEMLP, expert_order, routing_contrastive_loss

# ------------------------------------------------------------------ Algorithm 1, written plainly


def ffn(x, w1, b1, w2, b2):
    return F.gelu(x @ w1.T + b1, approximate="tanh") @ w2.T + b2


def expert(group, e):
    return (group.w1[e], group.b1[e], group.w2[e], group.b2[e])


def algorithm1(layer: MoEMLP, X, c, null, tau):
    """Algorithm 1 of the paper (training), with the layer's weights; returns (O, L_RCL)."""
    B, L, D = X.shape
    O = torch.zeros_like(X)
    Mu = c == null
    Mc = ~Mu
    if layer.uncond_experts is not None and Mu.any():  # Step 2
        Xu = X[Mu]
        O[Mu] = sum(ffn(Xu, *expert(layer.uncond_experts, k)) for k in range(layer.uncond_experts.num))
    loss = torch.zeros((), dtype=X.dtype)
    if Mc.any():
        Xc = X[Mc].reshape(-1, D)  # Step 3
        P = layer.prototypes
        Z = (Xc / Xc.norm(dim=1, keepdim=True)) @ (P / P.norm(dim=1, keepdim=True)).T
        S = Z
        G, indices = torch.topk(S, layer.top_k)
        Oc = torch.zeros_like(Xc)  # Step 4
        NE = P.shape[0]
        for i in range(NE):
            m = (indices == i).any(dim=1)
            if m.any():
                Gi = (G[m] * (indices[m] == i)).sum(dim=1)
                Oc[m] = Oc[m] + Gi[:, None] * ffn(Xc[m], *expert(layer.routed_experts, i))
        O[Mc] = O[Mc] + Oc.reshape(-1, L, D)
        # Step 5, Eq. 6: prototypes vs centroids of the tokens routed to each active expert
        active = [i for i in range(NE) if (indices == i).any()]
        if len(active) >= 2:
            means = [Xc[(indices == i).any(dim=1)].mean(0) for i in active]
            terms = []
            for a, i in enumerate(active):
                sims = torch.stack([F.cosine_similarity(P[i], mj, dim=0) for mj in means]) / tau
                terms.append(-(sims[a] - torch.logsumexp(sims, 0)))
            loss = torch.stack(terms).mean()
    if layer.shared_experts is not None:  # Step 6
        O = O + sum(ffn(X, *expert(layer.shared_experts, k)) for k in range(layer.shared_experts.num))
    return O, loss


def make_layer(spec="E6A1S1U1", dim=16, **kw):
    layer = MoEMLP(dim, MoEConfig(router="promoe", experts=spec, expert_mlp_ratio=2.0, **kw), mlp_ratio=4.0,
                   layer_seed=3).double()
    layer.train()
    return layer


@pytest.mark.parametrize("spec", ["E6A1S1U1", "E6A2S1U1", "E7A2S1U2", "E8A2S2U1"])
@pytest.mark.parametrize("with_uncond", [True, False])
def test_layer_matches_algorithm1(spec, with_uncond):
    torch.manual_seed(0)
    layer = make_layer(spec)
    null = 10
    X = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1, null, 3, null]) if with_uncond else torch.tensor([1, 2, 3, 4])
    out, aux = layer(X, c != null)
    ref, ref_loss = algorithm1(layer, X, c, null, 0.07)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux["rcl"].double(), ref_loss, rtol=1e-6, atol=1e-6)
    # gradients of output + RCL w.r.t. input and every parameter agree with the reference
    gy = torch.randn_like(out)
    params = [X] + list(layer.parameters())
    g_ours = torch.autograd.grad((out * gy).sum() + aux["rcl"], params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * gy).sum() + ref_loss, params, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_layer_gradcheck():
    torch.manual_seed(1)
    layer = MoEMLP(4, MoEConfig(router="promoe", experts="E4A2S1U1", expert_mlp_ratio=1.0, rcl_weight=0.0),
                   mlp_ratio=4.0, layer_seed=0).double().eval()
    X = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    cond = torch.tensor([True, False])
    assert torch.autograd.gradcheck(lambda x, p: layer(x, cond)[0] + 0 * p.sum(), (X, layer.prototypes))


def test_expert_order_is_a_stable_sort_with_its_inverse_and_counts():
    g = torch.Generator().manual_seed(0)
    exp = torch.randint(0, 5, (300,), generator=g)
    exp[exp == 3] = 1  # an expert without assignments
    order, inv, counts = expert_order(exp, None, 6)
    assert torch.equal(order, torch.argsort(exp, stable=True))
    assert torch.equal(inv[order], torch.arange(300)) and torch.equal(counts, torch.bincount(exp, minlength=6))
    assert expert_order(exp, torch.arange(300), 6)[1] is None  # expert choice: no inverse needed


def test_rcl_by_hand():
    # 2 experts used out of 3, tokens assigned by hand: loss is Eq. 6 over the two active experts
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    member = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)  # tokens -> experts 0, 0, 2
    P = torch.tensor([[1.0, 1.0], [5.0, 5.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    tau = 0.5
    loss = routing_contrastive_loss(x, member, P, tau)
    # means: m0 = (2, 0), m2 = (0, 2); cos(p0, m0) = cos(p0, m2) = 1/sqrt2; cos(p2, m0) = 0, cos(p2, m2) = 1
    s = 1 / math.sqrt(2)
    l0 = -(s / tau - math.log(math.exp(s / tau) + math.exp(s / tau)))
    l2 = -(1 / tau - math.log(math.exp(0.0) + math.exp(1 / tau)))
    assert abs(loss.item() - (l0 + l2) / 2) < 1e-6
    loss.backward()
    assert P.grad[0].abs().sum() > 0 and P.grad[2].abs().sum() > 0
    assert P.grad[1].abs().sum() == 0  # inactive expert's prototype untouched
    # fewer than two active experts -> 0
    one = torch.tensor([[0, 1, 0]] * 3, dtype=torch.float64)
    assert routing_contrastive_loss(x, one, P, tau).item() == 0.0


def test_rcl_gradient_reaches_prototypes_and_tokens():
    torch.manual_seed(0)
    layer = make_layer("E6A2S1U1")
    X = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)
    _, aux = layer(X, torch.tensor([True, True, False]))
    aux["rcl"].backward()
    assert layer.prototypes.grad.abs().sum() > 0
    assert X.grad[:2].abs().sum() > 0 and X.grad[2].abs().sum() == 0  # null-label tokens not in RCL


def test_conditional_routing_isolation():
    torch.manual_seed(0)
    layer = make_layer("E6A2S1U1").eval()
    X = torch.randn(4, 5, 16, dtype=torch.float64)
    cond = torch.tensor([True, False, True, False])
    base, _ = layer(X, cond)
    with torch.no_grad():  # perturb every routed expert: null-label samples must not change
        for p in layer.routed_experts.parameters():
            p.add_(torch.randn_like(p))
    after, _ = layer(X, cond)
    torch.testing.assert_close(after[~cond], base[~cond], rtol=0, atol=0)
    assert not torch.allclose(after[cond], base[cond])
    with torch.no_grad():  # perturb the unconditional expert: conditional samples must not change
        for p in layer.uncond_experts.parameters():
            p.add_(torch.randn_like(p))
    after2, _ = layer(X, cond)
    torch.testing.assert_close(after2[cond], after[cond], rtol=0, atol=0)
    assert not torch.allclose(after2[~cond], after[~cond])


def test_baseline_routers():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    cond = torch.tensor([True, True])
    tc = MoEMLP(32, MoEConfig(router="tc", experts="E4A1S0U0", expert_mlp_ratio=4.0, lb_weight=0.01,
                              rcl_weight=0.0), mlp_ratio=4.0, layer_seed=0).train()
    y, aux = tc(x, cond)
    assert y.shape == x.shape and aux["lb"] > 0 and aux["counts"].sum() == 32
    ec = MoEMLP(32, MoEConfig(router="ec", experts="E4A1S0U0", expert_mlp_ratio=4.0, rcl_weight=0.0),
                mlp_ratio=4.0, layer_seed=0).train()
    y, aux = ec(x, cond)
    assert aux["counts"].tolist() == [8, 8, 8, 8]  # fixed quota: capacity * k * tokens / experts
    pec = MoEMLP(32, MoEConfig(router="promoe_ec", experts="E6A1S1U1", expert_mlp_ratio=2.0), mlp_ratio=4.0,
                 layer_seed=0).train()
    y, aux = pec(x, torch.tensor([True, False]))
    assert aux["counts"].tolist() == [4, 4, 4, 4]  # quota over the 16 conditional tokens only
    assert aux["rcl"] > 0
    per_sample = MoEMLP(32, MoEConfig(router="ec", experts="E4A1S0U0", expert_mlp_ratio=4.0, rcl_weight=0.0,
                                      ec_group="sample"), mlp_ratio=4.0, layer_seed=0)
    _, _, _, member = per_sample._assign(per_sample._scores(x.reshape(32, 32)), torch.ones(32, dtype=torch.bool), 16)
    assert member.view(2, 16, 4).sum(1).tolist() == [[4.0] * 4] * 2  # every expert: 16 / 4 tokens of each sample


# ------------------------------------------------------------------ config, presets, counts

TABLE2 = {"ProMoE-S": (75e6, 33e6), "ProMoE-B": (300e6, 130e6), "ProMoE-L": (1.063e9, 458e6),
          "ProMoE-XL": (1.568e9, 675e6)}


@pytest.mark.parametrize("name", list(TABLE2))
def test_param_counts_match_table2(name, capsys):
    assert cli_main(["info", "--model", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    total, active = TABLE2[name]
    assert abs(info["total_params"] / total - 1) < 0.01
    assert abs(info["activated_params"] / active - 1) < 0.03


def test_dense_and_large_presets():
    dense = count_params(load_config(overrides=["model.preset=DiT-XL/2"]).model)
    assert abs(dense["total_params"] / 675e6 - 1) < 0.01 and dense["activated_params"] == dense["total_params"]
    big = count_params(load_config(overrides=["model.preset=ProMoE-H"]).model)
    assert big["total_params"] >= 10e9
    tc = count_params(load_config(overrides=["model.preset=TC-DiT-L"]).model)
    assert abs(tc["total_params"] / 1.163e9 - 1) < 0.01  # Tab. 9: DiT-MoE-L E8A1 1.163B


def test_expert_spec():
    s = ExpertSpec.parse("E14A1S1U1")
    assert (s.routed, s.top_k, s.shared, s.uncond) == (12, 1, 1, 1)
    assert ExpertSpec.parse("E8A1S0N0").routed == 8
    for bad in ["E2A1S1U1", "E4A5S0U0", "X14", "E14A0S1U1"]:
        with pytest.raises(ConfigError):
            ExpertSpec.parse(bad)


@pytest.mark.parametrize("override,line", [
    ("model.moe.router=magic", "model.moe.router: 'magic' is not one of none, promoe, promoe_ec, tc, ec"),
    ("model.moe.backend=cuda", "model.moe.backend: 'cuda' is not one of auto, loop, grouped, megablocks"),
    ("objective.name=DDPM", "objective.name: 'DDPM' is not one of flow, ddpm"),
    ("train.zero_stage=3", "train.zero_stage: 3 is not one of 0, 1, 2"),
    ("train.zero_stage=one", "train.zero_stage: cannot read 'one' as int"),
    ("wandb.mode=cloud", "wandb.mode: 'cloud' is not one of online, offline, disabled"),
])
def test_choices_come_from_the_fields_literal_types(override, line):
    """A setting's allowed values are its field's Literal[...] type: one error line lists them, for a value read
    from an override and for one set in code (checked by validate)."""
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value) == line
    assert load_config(overrides=["train.zero_stage=1"]).train.zero_stage == 1  # an int, as the type says
    cfg = load_config()
    cfg.model.moe.rcl_assign = "all"
    with pytest.raises(ConfigError, match="^model.moe.rcl_assign: 'all' is not one of topk, top1$"):
        validate(cfg)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(overrides=["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(overrides=["model.preset=ProMoE-XXXL"])
    with pytest.raises(ConfigError, match="model.moe.router"):
        load_config(overrides=["model.moe.router=magic"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(overrides=["train.steps=-1"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.profile_at: must be >= 0"):
        load_config(overrides=["train.profile_at=-2"])
    with pytest.raises(ConfigError, match="train.cuda_graphs: needs train.compile=true"):
        load_config(overrides=["train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="train.cuda_graphs: needs train.ep_size=1"):
        load_config(overrides=["train.cuda_graphs=true", "train.compile=true", "train.ep_size=2"])
    with pytest.raises(ConfigError, match="train.profile_steps: must be > 0"):
        load_config(overrides=["train.profile_steps=0"])
    for bad, message in [("train.lr=-1", "train.lr: must be >= 0"), ("train.lr=nan", "train.lr: must be >= 0"),
                         ("train.lr=inf", "train.lr: must be finite"),
                         ("train.betas=[0.9]", "train.betas: must be two"),
                         ("train.betas=[2,3]", "train.betas: must be two"), ("train.grad_clip=-1", "train.grad_clip"),
                         ("train.warmup_steps=-5", "train.warmup_steps"), ("train.micro_batch=-4", "train.micro_batch"),
                         ("train.weight_decay=nan", "train.weight_decay"), ("data.num_workers=-1", "data.num_workers")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match=r"override 'train.betas=\[0.9': the value is not valid YAML"):
        load_config(overrides=["train.betas=[0.9"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  depth: [4\ntrain:\n  steps: 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML: expected .* at line 3, column 6$"):
        load_config(broken)
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: ProMoE-S\n  depth: 4\n  moe:\n    experts: E6A2S1U1\n")
    cfg = load_config(f, ["model.moe.rcl_weight=10"])
    assert cfg.model.depth == 4 and cfg.model.hidden_size == 384 and cfg.model.moe.spec().top_k == 2
    assert cfg.model.moe.rcl_weight == 10.0


def test_cli_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "promoe_ds.cli", "info", "--model", "Nope"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown preset" in r.stderr


# ------------------------------------------------------------------ the full model


def tiny_cfg(**over):
    items = ["model.preset=ProMoE-S", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
             "model.input_size=8", "model.num_classes=10"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(overrides=items).model


def test_bad_inputs():
    model = build_model(tiny_cfg())
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 4, 16, 16), t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([-1, 2]))


@pytest.mark.parametrize("over", [{}, {"model.moe.router": "tc", "model.moe.experts": "E5A2S1U0"},
                                  {"model.qk_norm": "true", "model.moe.router": "promoe_ec"}])
def test_expert_parallel_slice_built_on_meta_has_the_full_models_weights(over):
    """The trainer's build: on the meta device, this rank's slice of the routed experts kept, then the weights
    made (``to_empty`` + ``init_weights``). Dense weights, buffers and the slice equal the full model's, bit for
    bit."""
    from promoe_ds.parallel.ep import shard_experts

    full = dict(build_model(tiny_cfg(**over), seed=5).named_buffers())
    full.update(build_model(tiny_cfg(**over), seed=5).named_parameters())
    with torch.device("meta"):
        half = build_model(tiny_cfg(**over), seed=5)
    shard_experts(half, 2, 1)
    half.to_empty(device="cpu").init_weights()
    n = half.blocks[1].mlp.spec.routed // 2
    assert (half.blocks[1].mlp.routed_experts.num, half.blocks[1].mlp.routed_experts.first_id) == (n, n)
    got = dict(half.named_parameters(), **dict(half.named_buffers()))
    assert got.keys() == full.keys()
    for name, t in got.items():
        assert torch.equal(t, full[name][n:] if ".routed_experts." in name else full[name]), name


def test_parameter_names():
    model = build_model(tiny_cfg())
    names = [n for n, _ in model.named_parameters()]
    layer = "blocks.1.mlp."
    for part in ("routed_experts", "uncond_experts", "shared_experts", "prototypes"):
        assert any(n.startswith(layer + part) for n in names), part


def test_promoe_s_forward_backward_batch8():
    cfg = load_config(overrides=["model.preset=ProMoE-S"]).model
    model = build_model(cfg).train()
    with torch.no_grad():  # adaLN-Zero starts with closed gates; open them so gradients reach the experts
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.02)
        model.final_layer.linear.weight.normal_(std=0.02)
    x = torch.randn(8, 4, 32, 32)
    y = torch.tensor([0, 5, 1000, 7, 1000, 3, 2, 1])
    out, aux = model(x, torch.rand(8) * 1000, y)
    assert out.shape == (8, 8, 32, 32)
    (out.square().mean() + aux["aux_loss"]).backward()
    assert aux["counts"].shape == (6, 12) and aux["counts"].sum() == 6 * 6 * 256
    assert model.blocks[1].mlp.prototypes.grad is not None
    assert model.blocks[1].mlp.uncond_experts.w1.grad.abs().sum() > 0


# ------------------------------------------------------------------ expert backends and torch.compile (CPU)


def rel_err(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


# E14A1S1U1 (the paper's spec): 4 of its 12 routed experts get no token here (an empty group's
# gradient must come out zero, biases included)
@pytest.mark.parametrize("spec", ["E6A1S1U1", "E8A2S2U1", "E7A2S1U2", "E14A1S1U1"])
def test_grouped_backend_matches_algorithm1(spec):
    # torch._grouped_mm runs on the CPU too (float32 / bf16): the grouped path is checked here, not only on GPU
    torch.manual_seed(0)
    layer = make_layer(spec)
    null = 10
    X = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1, null, 3, null])
    ref, ref_loss = algorithm1(layer, X, c, null, 0.07)
    gy = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * gy).sum() + ref_loss, [X] + list(layer.parameters()))
    layer = layer.float()
    layer.routed_experts.backend = layer.uncond_experts.backend = "grouped"
    X32 = X.detach().float().requires_grad_()
    out, aux = layer(X32, c != null)
    assert spec != "E14A1S1U1" or (aux["counts"] == 0).any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["rcl"].double(), ref_loss, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((out * gy.float()).sum() + aux["rcl"], [X32] + list(layer.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_grouped_backend_without_tokens_gives_zero_gradients():
    # experts that get no token (an expert-parallel rank, the unconditional expert of a batch without a
    # null label): empty output, and a zero gradient for every weight, so all ranks reduce the same tensors
    g = ExpertGroup(3, 16, 32)
    x = torch.zeros(0, 16, requires_grad=True)
    y = BACKENDS["grouped"](x, torch.zeros(3, dtype=torch.long), g.w1, g.b1, g.w2, g.b2)
    y.sum().backward()
    assert y.shape == (0, 16) and all(p.grad is not None and not p.grad.any() for p in g.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grouped_matches_loop_under_bf16_autocast_and_routing_stays_fp32(device):
    torch.manual_seed(0)
    layer = make_layer("E8A2S1U1", dim=32).float().to(device)
    X = torch.randn(4, 16, 32).to(device)
    cond = torch.tensor([True, False, True, True], device=device)
    with torch.no_grad():
        _, aux32 = layer(X, cond)  # no autocast
    res = {}
    for backend in ("loop", "grouped"):
        layer.routed_experts.backend = layer.uncond_experts.backend = backend
        layer.zero_grad()
        x = X.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y, aux = layer(x, cond)
        (y.float().square().mean() + aux["rcl"]).backward()
        res[backend] = (y.float(), x.grad, layer.routed_experts.w1.grad, layer.prototypes.grad)
        # Eq. 4 cosines and Eq. 6 are computed in float32 under autocast: same routing, same loss
        torch.testing.assert_close(aux["counts"], aux32["counts"])
        torch.testing.assert_close(aux["rcl"], aux32["rcl"], rtol=1e-6, atol=1e-6)
    for a, b in zip(res["grouped"], res["loop"]):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_bf16_weights_compute_what_autocast_computes(device, backend):
    """train.bf16_weights: the GEMM operands stored in bf16 give, under bf16 autocast, the loss and gradients that
    float32 weights of the same (bf16-representable) values give, bit for bit; the rest stays float32."""
    import copy

    from promoe_ds.optim import gemm_operands, keep_bf16_weights, master

    ref = build_model(tiny_cfg(**{"model.moe.experts": "E8A2S2U1"})).train().to(device)  # two shared experts
    ref.set_expert_backend(backend, device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # zero-initialised weights get values, every weight a gradient
            p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.02)
        for p in gemm_operands(ref):
            p.copy_(p.bfloat16().float())
    ours = copy.deepcopy(ref)
    keep_bf16_weights(ours)
    bf16 = {n for n, p in ours.named_parameters() if p.dtype == torch.bfloat16}
    assert {n for n, p in ours.named_parameters() if p.dtype == torch.float32} == {
        "y_embedder.weight", "blocks.1.mlp.prototypes", "blocks.1.mlp.shared_experts.b2"}  # not cast by autocast
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (master(p) is not p) == (n in bf16) and torch.equal(master(p), q), n
    x, t = torch.randn(4, 4, 8, 8, generator=gen).to(device), torch.rand(4, generator=gen).to(device)
    y = torch.tensor([1, 10, 3, 4], device=device)
    losses, grads = [], []
    for model in (ref, ours):
        with torch.autocast(device, dtype=torch.bfloat16):
            out, aux = model(x, t, y)
            loss = out.float().square().mean() + aux["aux_loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    for n, gr in grads[0].items():
        assert grads[1][n].dtype == (torch.bfloat16 if n in bf16 else torch.float32), n
        assert torch.equal(grads[1][n].float(), gr), n


def test_backend_choice_and_errors():
    model = build_model(tiny_cfg())
    assert model.set_expert_backend("auto", "cpu") == "loop"
    assert model.set_expert_backend("grouped", "cpu") == "grouped"
    assert model.blocks[1].mlp.uncond_experts.backend == "grouped"
    with pytest.raises(ConfigError, match="model.moe.backend: 'megablocks' needs a CUDA device"):
        model.set_expert_backend("megablocks", "cpu")
    odd = build_model(tiny_cfg(**{"model.moe.expert_mlp_ratio": 1.5, "model.hidden_size": 36}))  # widths 36, 54
    with pytest.raises(ConfigError, match="multiples of 8"):
        odd.set_expert_backend("grouped", "cpu")
    assert odd.set_expert_backend("auto", "cuda") == "loop"


def test_activation_checkpointing_same_gradients():
    model = build_model(tiny_cfg()).train()
    with torch.no_grad():
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.02)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4) * 1000, torch.tensor([1, 10, 3, 4])
    res = []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt
        model.zero_grad()
        out, aux = model(x, t, y)
        (out.square().mean() + aux["aux_loss"]).backward()
        res.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in res[0].items():
        torch.testing.assert_close(res[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_model_is_one_graph_and_matches_eager(device):
    """With grouped experts the whole forward, MoE layers included, is one torch.compile graph
    (no graph break, no host sync, also with activation checkpointing) and the compiled train step's
    loss and gradients match eager (on the GPU this also guards against inductor's mix-order-reduction
    gradient bugs)."""
    from promoe_ds.models.dit import compile_model

    model = build_model(tiny_cfg()).train().to(device)
    with torch.no_grad():  # open adaLN-Zero gates so every weight gets a gradient
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.02)
        model.final_layer.linear.weight.normal_(std=0.02)
    model.set_expert_backend("grouped", device)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g).to(device), (torch.rand(4, generator=g) * 1000).to(device)
    y = torch.tensor([1, 10, 3, 4], device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16)  # inductor's grouped GEMM wants bf16

    def step(fwd):
        model.zero_grad()
        with autocast:
            out, aux = fwd(x, t, y)
            loss = out.float().square().mean() + aux["aux_loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(model)
    model.grad_checkpoint = True  # the large presets' setting: activation checkpointing per block
    with autocast:
        explained = torch._dynamo.explain(model)(x, t, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    loss_c, grads_c = step(compile_model(model))
    torch.testing.assert_close(loss_c, loss, rtol=1e-3, atol=1e-4)
    for name, grad in grads.items():
        assert rel_err(grads_c[name], grad) < 3e-2, name
