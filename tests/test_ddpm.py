"""ADM/DiT Gaussian diffusion checked against closed forms derived independently in float64 numpy."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from promoe_ds.config import ObjectiveConfig
from promoe_ds.diffusion import build_objective
from promoe_ds.diffusion.ddpm import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl, space_timesteps

T = 1000
LN2 = math.log(2.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def np_schedule(T):
    """betas from the DDPM paper (1e-4 .. 0.02 at T = 1000) and abar as an explicit running product."""
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    abar, acc = np.empty(T), 1.0
    for t in range(T):
        acc *= 1 - betas[t]
        abar[t] = acc
    return betas, abar


def np_posterior(x0, xt, t, betas, abar):
    """q(x_{t-1} | x_t, x_0) by Bayes: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times the one-step
    likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t), completing the square (precision-weighted mean)."""
    prior_var = 1 - abar[t - 1]
    prec = 1 / prior_var + (1 - betas[t]) / betas[t]
    mean = (np.sqrt(abar[t - 1]) * x0 / prior_var + np.sqrt(1 - betas[t]) * xt / betas[t]) / prec
    return mean, 1 / prec


def np_hybrid_loss(x0, noise, eps, v, t, betas, abar):
    """Per-sample mse + (T/1000) L_t for ONE timestep t, in numpy/scipy."""
    xt = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise
    x0_hat = (xt - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
    var_tilde_1 = np_posterior(0.0, 0.0, 1, betas, abar)[1]
    log_var_tilde = np.log(var_tilde_1 if t == 0 else np_posterior(0.0, 0.0, t, betas, abar)[1])
    frac = (v + 1) / 2
    log_var = frac * np.log(betas[t]) + (1 - frac) * log_var_tilde
    axes = tuple(range(1, x0.ndim))
    if t == 0:  # decoder: q(x_{-1} | x_0) is a point mass, the model mean is x0_hat
        sd = np.exp(0.5 * log_var)
        lo, hi = (x0 - 1 / 255 - x0_hat) / sd, (x0 + 1 / 255 - x0_hat) / sd
        p = np.where(x0 < -0.999, norm.cdf(hi), np.where(x0 > 0.999, norm.sf(lo), norm.cdf(hi) - norm.cdf(lo)))
        vb = -np.log(p).mean(axis=axes) / LN2
    else:
        m_true, var_true = np_posterior(x0, xt, t, betas, abar)
        m_model, _ = np_posterior(x0_hat, xt, t, betas, abar)
        var_model = np.exp(log_var)
        kl = np.log(np.sqrt(var_model / var_true)) + (var_true + (m_true - m_model) ** 2) / (2 * var_model) - 0.5
        vb = kl.mean(axis=axes) / LN2
    mse = ((noise - eps) ** 2).mean(axis=axes)
    return mse + vb * T / 1000, mse, vb


def test_build_and_draw():
    obj = build_objective(ObjectiveConfig(name="ddpm"))
    assert obj.name == "ddpm" and obj.num_timesteps == 1000
    d = obj.draw(4000, (4, 2, 2), _gen())
    assert d["noise"].shape == (4000, 4, 2, 2) and d["t"].dtype == torch.int64
    assert d["t"].min() >= 0 and d["t"].max() <= T - 1
    assert abs(d["t"].double().mean().item() - (T - 1) / 2) < 15  # uniform over 0..T-1


def test_schedule_matches_running_product():
    proc = GaussianDiffusion().process
    betas, abar = np_schedule(T)
    assert proc.betas[0] == pytest.approx(1e-4) and proc.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(proc.betas, betas, rtol=1e-14)
    np.testing.assert_allclose(proc.alphas_cumprod, abar, rtol=1e-12)


def test_q_xt_given_x0_against_iterated_one_step_kernel():
    """Compose x_t = sqrt(1-beta_t) x_{t-1} + sqrt(beta_t) z step by step: the mean coefficient and the
    variance obey a recursion; its result must equal the closed form q(x_t|x_0) used by the code."""
    proc = GaussianDiffusion().process
    betas, _ = np_schedule(T)
    coef, var = np.empty(T), np.empty(T)
    c, s = 1.0, 0.0
    for t in range(T):
        c, s = c * np.sqrt(1 - betas[t]), (1 - betas[t]) * s + betas[t]
        coef[t], var[t] = c, s
    x0 = torch.randn(T, 3, 2, 2, dtype=torch.float64)
    t = torch.arange(T)
    mean, variance = proc.q_mean_variance(x0, t)
    np.testing.assert_allclose(mean.numpy(), coef[:, None, None, None] * x0.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(variance.flatten().numpy(), var, rtol=1e-10)
    noise = torch.randn_like(x0)
    np.testing.assert_allclose(proc.q_sample(x0, t, noise).numpy(),
                               mean.numpy() + np.sqrt(var)[:, None, None, None] * noise.numpy(), rtol=1e-10, atol=1e-12)


def test_posterior_against_bayes_rule():
    proc = GaussianDiffusion().process
    betas, abar = np_schedule(T)
    t = torch.tensor([1, 2, 10, 500, 998, 999])
    x0, xt = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    mean, var, log_var = proc.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        m_ref, v_ref = np_posterior(x0[i].numpy(), xt[i].numpy(), ti, betas, abar)
        np.testing.assert_allclose(mean[i].numpy(), m_ref, rtol=1e-9, atol=1e-12)
        assert var[i].item() == pytest.approx(v_ref, rel=1e-10)
        assert log_var[i].item() == pytest.approx(math.log(v_ref), rel=1e-10)
    # t = 0: the true posterior variance is 0; the clipped log-variance takes beta~_1
    _, var0, log_var0 = proc.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert var0.item() == 0 and log_var0.item() == pytest.approx(math.log(np_posterior(0, 0, 1, betas, abar)[1]))


def test_normal_kl_closed_form():
    m1, m2 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    s1, s2 = torch.tensor([0.5, 1.2, 0.7], dtype=torch.float64), torch.tensor([0.9, 0.4, 0.7], dtype=torch.float64)
    kl = normal_kl(m1, 2 * s1.log(), m2, 2 * s2.log()).numpy()
    a, b, sa, sb = (u.numpy() for u in (m1, m2, s1, s2))
    ref = np.log(sb / sa) + (sa ** 2 + (a - b) ** 2) / (2 * sb ** 2) - 0.5
    np.testing.assert_allclose(kl, ref, rtol=1e-12)
    assert kl[2] == 0.0
    # Monte Carlo sanity of the definition E_p[log p - log q]
    x = np.random.default_rng(0).normal(a[0], sa[0], 400_000)
    mc = np.mean(norm.logpdf(x, a[0], sa[0]) - norm.logpdf(x, b[0], sb[0]))
    assert mc == pytest.approx(ref[0], abs=5e-3)


def test_discretized_decoder_likelihood():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 2.7, -3.1], dtype=torch.float64)  # latents leave [-1, 1]
    means = torch.tensor([-0.9, -0.45, 0.01, 0.5, 0.8, 1.0, -1.0], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([0.1, 0.05, 0.02, 0.3, 0.2, 0.5, 0.4], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, means, log_scales).numpy()
    xs, mu, sd = x.numpy(), means.numpy(), log_scales.exp().numpy()
    hi, lo = norm.cdf(xs + 1 / 255, mu, sd), norm.cdf(xs - 1 / 255, mu, sd)
    ref = np.log(np.where(xs < -0.999, hi, np.where(xs > 0.999, 1 - lo, hi - lo)))
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    # the bins on [-1, 1] (edges open-ended) form a probability distribution
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    p = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, 0.2),
                                            torch.full_like(grid, math.log(0.3))).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("t", [0, 1, 437, T - 1])
def test_hybrid_loss_matches_reference_at_edges(t):
    obj = GaussianDiffusion()
    betas, abar = np_schedule(T)
    g = torch.Generator().manual_seed(t)
    x0 = 2.5 * torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)  # latent-like range, beyond [-1, 1]
    noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    v = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64).view(3, 1, 1, 1).expand(3, 4, 4, 4)
    seen = {}

    def model_fn(x_t, t_model):
        seen["t"] = t_model
        return torch.cat([eps, v], 1)

    out = obj.training_losses(model_fn, x0, {"noise": noise, "t": torch.full((3,), t)})
    loss, mse, vb = np_hybrid_loss(x0.numpy(), noise.numpy(), eps.numpy(), v.numpy(), t, betas, abar)
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(loss.mean(), rel=1e-9)
    assert out["mse"].item() == pytest.approx(mse.mean(), rel=1e-12)
    assert out["vlb"].item() == pytest.approx(vb.mean(), rel=1e-9)
    assert seen["t"].dtype == torch.float32 and (seen["t"] == t).all()


def test_vlb_weight_and_timestep_scaling():
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    out = torch.randn(4, 4, 2, 2, generator=g, dtype=torch.float64).clamp(-1, 1)
    draws = {"noise": noise, "t": torch.tensor([3, 50, 70, 99])}
    base = GaussianDiffusion(num_timesteps=100, vlb_weight=1.0).training_losses(lambda x, t: out, x0, draws)
    heavy = GaussianDiffusion(num_timesteps=100, vlb_weight=4.0).training_losses(lambda x, t: out, x0, draws)
    assert heavy["loss"].item() == pytest.approx(base["mse"].item() + 4 * base["vlb"].item(), rel=1e-12)
    # iDDPM: lambda = 0.001 on L_vlb = T * L_t, i.e. the per-step term is scaled by T / 1000
    proc = GaussianDiffusion(num_timesteps=100).process
    raw = proc.vb_terms_bpd(out, x0, proc.q_sample(x0, draws["t"], noise), draws["t"])
    assert base["vlb"].item() == pytest.approx(raw.mean().item() * 100 / 1000, rel=1e-12)


def test_vlb_sends_no_gradient_into_eps_channels():
    obj = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(8, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    out = torch.randn(8, 8, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    draws = {"noise": noise, "t": torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])}
    res = obj.training_losses(lambda x, t: out, x0, draws)
    res["loss"].backward()
    n = x0[0].numel()
    expected_eps_grad = 2 * (out[:, :4].detach() - noise) / (8 * n)  # d mse / d eps only
    torch.testing.assert_close(out.grad[:, :4], expected_eps_grad, rtol=1e-12, atol=1e-15)
    assert (out.grad[:, 4:].abs().flatten(1).sum(1) > 0).all()  # the variance channels learn from the VLB
    assert res["vlb"].item() > 0


def test_space_timesteps_like_adm():
    keep = space_timesteps(1000, 250)
    # ADM walks a float cursor by (size - 1) / (count - 1) and rounds each position
    cur, adm = 0.0, []
    for _ in range(250):
        adm.append(round(cur))
        cur += 999 / 249
    assert keep == adm and keep[0] == 0 and keep[-1] == 999 and len(set(keep)) == 250
    assert set(np.diff(keep)) <= {4, 5}
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, 1001)


@pytest.mark.parametrize("steps", [2, 50, 250, 1000])
def test_respacing_keeps_abar_at_kept_steps(steps):
    obj = GaussianDiffusion()
    proc = obj.respaced(steps)
    keep = space_timesteps(T, steps)
    np.testing.assert_allclose(proc.alphas_cumprod, np_schedule(T)[1][keep], rtol=1e-12)
    assert proc.num_timesteps == steps and proc.timestep_map.tolist() == keep
    assert obj.respaced(steps) is proc  # cached


def _gaussian_eps_model(obj, s2, v):
    """The exact eps-predictor for data N(0, s2): E[eps | x_t] = sqrt(1 - abar) x_t / (abar s2 + 1 - abar),
    evaluated at the ORIGINAL step the model is given (so a wrong timestep map is caught)."""
    abar = torch.from_numpy(obj.process.alphas_cumprod)
    calls = []

    def model_fn(x, t):
        calls.append(t[0].item())
        a = abar[t.long()].view(-1, 1, 1, 1).to(x)
        return torch.cat([(1 - a).sqrt() * x / (a * s2 + 1 - a), torch.full_like(x, v)], 1)

    return model_fn, calls


def np_sampler_std(steps, v, s2):
    """Exact std of the ancestral sampler's output for data N(0, s2) and the exact eps-predictor: every
    step is linear, x <- A x + sqrt(Sigma) z, so Var <- A^2 Var + Sigma (respaced chain, Bayes posterior)."""
    _, abar_full = np_schedule(T)
    abar = abar_full[space_timesteps(T, steps)]
    betas = 1 - abar / np.append(1.0, abar[:-1])
    var = 1.0
    for i in reversed(range(steps)):
        k = np.sqrt(1 - abar[i]) / (abar[i] * s2 + 1 - abar[i])  # eps_hat = k x
        x0_coef = (1 - np.sqrt(1 - abar[i]) * k) / np.sqrt(abar[i])  # x0_hat = x0_coef x
        if i == 0:  # last step: the mean x0_hat, no noise
            return np.sqrt(x0_coef ** 2 * var)
        c_x0, c_xt = np_posterior(1.0, 0.0, i, betas, abar)[0], np_posterior(0.0, 1.0, i, betas, abar)[0]
        frac = (v + 1) / 2
        log_sigma = frac * np.log(betas[i]) + (1 - frac) * np.log(np_posterior(0.0, 0.0, i, betas, abar)[1])
        var = (c_x0 * x0_coef + c_xt) ** 2 * var + np.exp(log_sigma)


def test_ancestral_sampler_recovers_a_gaussian():
    obj = GaussianDiffusion()
    noise = torch.randn(8000, 1, 2, 2, generator=_gen(0), dtype=torch.float64)
    exact = {}
    for v in (-1.0, 1.0):
        model_fn, calls = _gaussian_eps_model(obj, 0.25, v)
        std = obj.sample(model_fn, noise, 250, generator=_gen(1)).std().item()
        assert calls == space_timesteps(T, 250)[::-1]
        exact[v] = np_sampler_std(250, v, 0.25)
        assert std == pytest.approx(exact[v], rel=0.015)
    # the posterior variance beta~ (v = -1) undershoots, beta (v = +1) overshoots the data std 0.5
    assert 0.47 < exact[-1.0] < 0.5 < exact[1.0] < 0.52


def test_sampling_determinism_and_per_row_generators():
    obj = GaussianDiffusion()
    model_fn, _ = _gaussian_eps_model(obj, 0.5, 0.3)
    noise = torch.randn(3, 4, 2, 2, generator=_gen(5))
    a = obj.sample(model_fn, noise, 25, generator=_gen(7))
    assert torch.equal(a, obj.sample(model_fn, noise.clone(), 25, generator=_gen(7)))
    assert not torch.equal(a, obj.sample(model_fn, noise, 25, generator=_gen(8)))
    # one generator per row: a row's sample does not depend on the rest of the batch
    rows = obj.sample(model_fn, noise, 25, generator=[_gen(10 + i) for i in range(3)])
    alone = obj.sample(model_fn, noise[1:2], 25, generator=[_gen(11)])
    torch.testing.assert_close(rows[1:2], alone, rtol=0, atol=1e-6)


def test_two_step_sampler_by_hand():
    """steps = 2 keeps t in {0, 999}: x <- mu_1 + sigma_1 z with z the generator's first draw, then x <- mu_0."""
    obj = GaussianDiffusion()
    proc = obj.respaced(2)

    def model_fn(x, t):
        return torch.cat([0.1 * x, torch.full_like(x, 0.5)], 1)

    noise = torch.randn(2, 4, 2, 2, generator=_gen(0), dtype=torch.float64)
    z = torch.randn(noise.shape, generator=_gen(7)).double()
    mean1, log_var1 = proc.p_mean_variance(model_fn(noise, None), noise, torch.tensor([1, 1]))
    x = mean1 + torch.exp(0.5 * log_var1) * z
    expected, _ = proc.p_mean_variance(model_fn(x, None), x, torch.tensor([0, 0]))
    torch.testing.assert_close(obj.sample(model_fn, noise, 2, generator=_gen(7)), expected, rtol=1e-12, atol=1e-12)


def test_hybrid_loss_trains_a_tiny_model():
    """A few hundred steps of a tiny per-pixel MLP on toy latents lower both loss terms by a margin."""
    torch.manual_seed(0)
    obj = GaussianDiffusion()
    net = torch.nn.Sequential(torch.nn.Conv2d(2 + 16, 64, 1), torch.nn.SiLU(), torch.nn.Conv2d(64, 4, 1))
    freqs = torch.exp(-math.log(1000) * torch.arange(8) / 8)

    def model_fn(x, t):
        emb = (t[:, None] * freqs)
        emb = torch.cat([emb.sin(), emb.cos()], 1)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return net(torch.cat([x, emb], 1))

    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = _gen(0)
    data = torch.tensor([[0.8, -0.5], [-0.6, 0.4]])  # two toy "latent" points, 2 channels

    def batch(n):
        return data[torch.randint(0, 2, (n,), generator=g)][:, :, None, None].expand(-1, -1, 2, 2)

    held_out = (batch(1024), obj.draw(1024, (2, 2, 2), g))

    def evaluate():
        with torch.no_grad():
            res = obj.training_losses(model_fn, *held_out)
        return res["mse"].item(), res["vlb"].item()

    mse0, vlb0 = evaluate()
    for _ in range(300):
        loss = obj.training_losses(model_fn, batch(64), obj.draw(64, (2, 2, 2), g))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    mse1, vlb1 = evaluate()
    assert mse1 < 0.3 * mse0 and vlb1 < 0.7 * vlb0
