"""Rectified flow with SD3 logit-normal timesteps (paper Sec. 5.1 / App. A; Esser et al. 2024).

    x_t = (1 - sigma) x_0 + sigma eps,    target v = eps - x_0            (paper Sec. 3, Eq. 1)
    sigma = sigmoid(n),  n ~ N(logit_mean, logit_std^2)                   (SD3 Eq. 19, logit-normal)
    sigma' = s sigma / (1 + (s - 1) sigma)                                (SD3 timestep shift, s = shift)

The model sees ``1000 * sigma`` as its timestep; the loss is the MSE on the first C output channels.
Sampling integrates dx/dsigma = v with Euler steps from sigma = 1 (noise) to sigma = 0 (data).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from promoe_ds.diffusion import Objective


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift: s sigma / (1 + (s - 1) sigma); identity for s = 1, fixes 0 and 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class RectifiedFlow(Objective):
    name = "flow"

    def __init__(self, shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0):
        if shift <= 0:
            raise ValueError(f"objective.shift must be > 0, got {shift}")
        self.shift, self.logit_mean, self.logit_std = shift, logit_mean, logit_std

    def draw_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        n = self.logit_mean + self.logit_std * torch.randn(batch, generator=generator)
        return shift_sigma(torch.sigmoid(n), self.shift)

    def training_losses(self, model_fn, x0, draws):
        C = x0.shape[1]
        noise, sigma = draws["noise"].to(x0), draws["t"].to(x0)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - s) * x0 + s * noise
        v = model_fn(x_t, (1000 * sigma).float())[:, :C].to(x0.dtype)
        mse = ((v - (noise - x0)) ** 2).flatten(1).mean(1)
        loss = mse.mean()
        return {"loss": loss, "mse": loss.detach()}

    def sigmas(self, steps: int) -> torch.Tensor:
        """The ``steps + 1`` sampling noise levels, 1 -> 0, uniform in sigma then shifted (float64)."""
        return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift)

    @torch.no_grad()
    def sample(self, model_fn, noise, steps, generator=None, progress=False):
        """Euler: x <- x + (sigma_next - sigma) v(x, sigma). Deterministic; ``generator`` is unused."""
        sig = self.sigmas(steps).tolist()
        x = noise
        for i in tqdm(range(steps), disable=not progress, desc="flow euler"):
            t = torch.full((x.shape[0],), 1000 * sig[i], device=x.device, dtype=torch.float32)
            v = model_fn(x, t)[:, : x.shape[1]].to(x.dtype)
            x = x + (sig[i + 1] - sig[i]) * v
        return x
