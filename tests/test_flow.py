"""Rectified flow: formulas, timestep shift, logit-normal draw, Euler sampler, determinism."""
import math

import numpy as np
import pytest
import torch

from promoe_ds.config import ObjectiveConfig
from promoe_ds.diffusion import build_objective
from promoe_ds.diffusion.flow import RectifiedFlow, shift_sigma


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_build_and_draw_shapes():
    obj = build_objective(ObjectiveConfig(name="flow", shift=2.0))
    assert obj.name == "flow" and obj.shift == 2.0
    d = obj.draw(5, (4, 8, 8), _gen())
    assert d["noise"].shape == (5, 4, 8, 8) and d["t"].shape == (5,)
    assert d["noise"].device.type == "cpu" and ((d["t"] > 0) & (d["t"] < 1)).all()
    # the global draw is one stream: the same seed gives the same step, rows can be sliced per rank
    d2 = obj.draw(5, (4, 8, 8), _gen())
    assert all(torch.equal(d[k], d2[k]) for k in d)


def test_interpolation_target_and_loss():
    torch.manual_seed(0)
    obj = RectifiedFlow()
    x0 = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    draws = {"noise": torch.randn(3, 4, 4, 4, dtype=torch.float64), "t": torch.tensor([0.1, 0.5, 0.9])}
    pred = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    seen = {}

    def model_fn(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return pred

    out = obj.training_losses(model_fn, x0, draws)
    s = np.array([0.1, 0.5, 0.9])[:, None, None, None]
    x0n, en = x0.numpy(), draws["noise"].numpy()
    np.testing.assert_allclose(seen["x_t"].numpy(), (1 - s) * x0n + s * en, rtol=0, atol=1e-7)
    np.testing.assert_allclose(seen["t"].numpy(), [100.0, 500.0, 900.0], rtol=1e-6)
    expected = np.mean((pred.numpy()[:, :4] - (en - x0n)) ** 2)  # MSE on the first C channels only
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["mse"].item() == pytest.approx(expected, rel=1e-6) and not out["mse"].requires_grad


def test_loss_gradient_flows_only_into_prediction_channels():
    obj = RectifiedFlow()
    x0 = torch.randn(2, 4, 2, 2)
    pred = torch.zeros(2, 8, 2, 2, requires_grad=True)
    obj.training_losses(lambda x, t: pred, x0, obj.draw(2, (4, 2, 2), _gen()))["loss"].backward()
    assert pred.grad[:, :4].abs().sum() > 0 and pred.grad[:, 4:].abs().sum() == 0


def test_shift_mapping():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigma(s, 1.0), s)
    out = shift_sigma(s, 3.0)
    assert out[0] == 0 and out[-1] == 1 and (out[1:] > out[:-1]).all() and (out[1:-1] > s[1:-1]).all()
    assert shift_sigma(torch.tensor(0.5, dtype=torch.float64), 3.0).item() == pytest.approx(0.75)
    # shifting by s then by 1/s is the identity (the map is a Moebius transform in sigma / (1 - sigma))
    np.testing.assert_allclose(shift_sigma(out, 1 / 3.0).numpy(), s.numpy(), atol=1e-12)


def test_logit_normal_draw_statistics():
    obj = RectifiedFlow(logit_mean=0.5, logit_std=0.7)
    t = obj.draw_t(200_000, _gen(1)).double()
    n = torch.log(t / (1 - t))
    assert n.mean().item() == pytest.approx(0.5, abs=0.01)
    assert n.std().item() == pytest.approx(0.7, abs=0.01)
    # with a shift the draw is the shifted logit-normal: logit(sigma') = logit(sigma) + log(s)
    t3 = RectifiedFlow(shift=3.0, logit_mean=0.5, logit_std=0.7).draw_t(200_000, _gen(1)).double()
    np.testing.assert_allclose(torch.log(t3 / (1 - t3)).numpy(), n.numpy() + math.log(3.0), atol=1e-4)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 1.0), (25, 3.0)])
def test_euler_lands_on_x0_for_the_straight_path_field(steps, shift):
    """For one data point x0 the conditional field v = eps - x0 is constant along the straight path,
    and v(x, sigma) = (x - x0) / sigma is the same field written in x: Euler integrates both exactly."""
    obj = RectifiedFlow(shift=shift)
    x0 = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    noise = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    const = obj.sample(lambda x, t: torch.cat([noise - x0, torch.zeros_like(x0)], 1), noise, steps)
    torch.testing.assert_close(const, x0, rtol=0, atol=1e-12)
    sigmas = []

    def field(x, t):
        sigma = t.double()[:, None, None, None] / 1000
        sigmas.append(sigma.flatten()[0].item())
        return torch.cat([(x - x0) / sigma, torch.zeros_like(x)], 1)

    torch.testing.assert_close(obj.sample(field, noise, steps), x0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sigmas, obj.sigmas(steps)[:-1].numpy(), rtol=1e-6)
    assert sigmas[0] == 1.0 and len(sigmas) == steps


def test_euler_converges_to_the_exact_gaussian_flow():
    """Data N(0, s^2): the marginal field E[eps - x0 | x_t] = x_t (sigma - (1-sigma) s^2) / Var(x_t) is linear,
    its exact flow maps noise z to s z; Euler (first order) approaches s with an error ~ 1/steps."""
    s2 = 0.25
    obj = RectifiedFlow(shift=2.0)

    def field(x, t):
        sig = t.double()[:, None, None, None] / 1000
        return (x * (sig - (1 - sig) * s2) / ((1 - sig) ** 2 * s2 + sig ** 2)).repeat(1, 2, 1, 1)

    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    err = {n: abs(obj.sample(field, one, n).item() - math.sqrt(s2)) for n in (250, 1000)}
    assert err[1000] < 2e-3 and 3.5 < err[250] / err[1000] < 4.5


def test_sampler_is_deterministic():
    obj = RectifiedFlow(shift=2.0)
    w = torch.randn(8, 4, 1, 1, generator=_gen(2))

    def model(x, t):
        return torch.nn.functional.conv2d(torch.tanh(x) * (t[:, None, None, None] / 1000), w)

    noise = torch.randn(2, 4, 4, 4, generator=_gen(4))
    assert torch.equal(obj.sample(model, noise, 10), obj.sample(model, noise.clone(), 10))
