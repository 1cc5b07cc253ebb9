"""optim.AdamWEMA (train.fused_ema): AdamW and the EMA in one compiled pass, against both written plainly."""
import torch

from promoe_ds.optim import AdamWEMA

SHAPES = [(6, 5), (7,), (3, 2, 4), (1, 9)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def plain_adamw_ema(p, m, v, ema, g, t, lr, scale, with_ema, decay):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter, Algorithm 2) and the EMA, float64, one tensor."""
    b1, b2 = HYPER["betas"]
    g = g / scale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * HYPER["weight_decay"]) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + HYPER["eps"])
    return p, m, v, (decay * ema + (1 - decay) * p if with_ema else ema)


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    averages = {p: p.detach().clone() for p in params[:3]}  # the last has no EMA on this rank (sharded EMA)
    return params, averages, gen


def test_adamw_ema_matches_plain_adamw_and_ema_and_skips_on_overflow():
    params, averages, gen = make()
    opt = AdamWEMA(params, averages, 0.9, **HYPER)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ref = [[p.detach().double(), torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64),
            p.detach().double()] for p, s in zip(params, SHAPES)]
    t = 0
    for i, (lr, scale) in enumerate([(3e-3, 1.0), (1e-3, 2.5), (2e-3, 1.0), (2e-3, 4.0), (5e-4, 1.0)]):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if i == 3:  # no gradient (an unused expert): a zero one, as DeepSpeed's reduction makes on several ranks
            params[1].grad, grads[1] = None, torch.zeros(SHAPES[1])
        opt.param_groups[0]["lr"] = lr  # as DeepSpeed's LR schedule sets it: no recompilation
        opt.grad_scale = torch.tensor(scale)
        opt.overflow = i == 2  # a skipped step leaves weights, moments, EMA and the step count bit for bit
        before = [x.clone() for x in params + list(averages.values())]
        opt.step()
        if opt.overflow:
            assert all(torch.equal(a, b) for a, b in zip(before, params + list(averages.values())))
            continue
        t += 1
        for k, (r, g) in enumerate(zip(ref, grads)):
            r[:] = plain_adamw_ema(*r, g.double(), t, lr, scale, k < 3, 0.9)
    for k, (p, r) in enumerate(zip(params, ref)):
        st = opt.state[p]
        assert st["step"].item() == t == 4
        torch.testing.assert_close(p.detach().double(), r[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["exp_avg"].double(), r[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"].double(), r[2], rtol=1e-5, atol=1e-9)
        if k < 3:
            torch.testing.assert_close(averages[p].double(), r[3], rtol=1e-5, atol=1e-6)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert graphs == 2, graphs  # with and without EMA; a new lr, step or missing gradient compiles nothing


def test_state_dict_moves_between_adamwema_and_torch_fused_adamw():
    """A checkpoint of either optimizer resumes in the other (train.fused_ema switched between runs): two steps
    of AdamWEMA then two of torch's fused AdamW equal two of torch's then two of AdamWEMA."""
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(10 + i)) for s in SHAPES] for i in range(4)]

    def run(first_ours: bool):
        params, averages, _ = make(1)
        ours = AdamWEMA(params, averages, 0.9, **HYPER)
        theirs = torch.optim.AdamW(params, **HYPER, fused=True)
        order = [ours, ours, theirs, theirs] if first_ours else [theirs, theirs, ours, ours]
        for i, opt in enumerate(order):
            if i == 2:
                opt.load_state_dict(order[1].state_dict())
            for p, g in zip(params, grads[i]):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params], opt.state_dict()["state"]

    (a, sa), (b, sb) = run(True), run(False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for k in sa:
        assert sa[k]["step"].item() == sb[k]["step"].item() == 4
        torch.testing.assert_close(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_bf16_weights_step_their_float32_masters():
    """train.bf16_weights: parameters kept in bf16 (optim.keep_bf16_weights) step their float32 masters from their
    bf16 gradients exactly as float32 parameters step from those gradients in float32, the parameters get
    bf16(master), the EMA follows the master; the state stays float32 through a checkpoint."""
    from promoe_ds.optim import keep_bf16_weights, master

    class Net(torch.nn.Module):  # two linear layers (kept in bf16) and one other tensor (stays float32)
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3, bias=False)
            self.table = torch.nn.Parameter(torch.randn(4, 5))

    def build():
        torch.manual_seed(0)
        net = Net()
        return net, [*net.a.parameters(), *net.b.parameters(), net.table]

    _, ref = build()
    net, ours = build()
    keep_bf16_weights(net)
    assert [p.dtype for p in ours] == [torch.bfloat16] * 3 + [torch.float32] and master(ours[3]) is ours[3]
    ref_avg = {p: p.detach().clone() for p in (ref[0], ref[3])}  # an EMA for a bf16 and a float32 one
    our_avg = {p: master(p).detach().clone() for p in (ours[0], ours[3])}
    ref_opt, opt = AdamWEMA(ref, ref_avg, 0.9, **HYPER), AdamWEMA(ours, our_avg, 0.9, **HYPER)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        for r, p in zip(ref, ours):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, r.grad = g, g.float()
        for o in (ref_opt, opt):
            o.grad_scale = torch.tensor(1.5)
            o.step()
        for r, p in zip(ref, ours):
            assert master(p).dtype == torch.float32 and torch.equal(master(p), r), step
            assert torch.equal(p.detach(), r.detach().to(p.dtype)), step
        for r, p in zip(ref_avg, our_avg):
            assert torch.equal(our_avg[p], ref_avg[r]), step
    assert not torch.equal(ours[0].detach().float(), master(ours[0]))  # the master holds more than bf16 does
    opt.zero_grad()
    assert all(p.grad is None for p in ours)
    again = AdamWEMA(ours, our_avg, 0.9, **HYPER)
    again.load_state_dict(opt.state_dict())  # torch casts a state to its param group's dtype: the masters'
    for p in ours:
        st = again.state[master(p)]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(st["exp_avg_sq"], opt.state[master(p)]["exp_avg_sq"])
