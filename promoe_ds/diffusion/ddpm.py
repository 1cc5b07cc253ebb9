"""Gaussian diffusion as in ADM / DiT (Ho et al. 2020; Nichol & Dhariwal 2021 "improved DDPM").

Discrete steps t = 0..T-1 with a linear beta schedule; the model predicts eps (first C output channels)
and v in [-1, 1] (channels C..2C) that interpolates the reverse-process log-variance (iDDPM Eq. 15):

    q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)                               (DDPM Eq. 4)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),                                 (DDPM Eq. 6-7)
        c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
        beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    p(x_{t-1} | x_t)      = N(mu(x_t, x0_hat), Sigma),  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
        log Sigma = frac log beta_t + (1 - frac) log beta~_t,  frac = (v + 1) / 2               (iDDPM Eq. 15)
    L_hybrid = L_simple + lambda L_vlb,  lambda = 0.001, L_vlb ~ T E_t[L_t]  =>  mse + (T/1000) L_t
                                                                                           (iDDPM Eq. 16)
    L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, -log p(x_0|x_1) (discretized Gaussian
    decoder, 1/255 bins on [-1, 1]) for t = 0, both in bits per dimension; the mean is detached in
    L_vlb so it only trains the variance (iDDPM Sec. 3.1).

log beta~ is "clipped": its t = 0 entry (0) is replaced by beta~_1, as in ADM. Sampling respaces the
process to ``steps`` evenly spaced kept steps (ADM ``space_timesteps``) and runs ancestral sampling
with the learned variance, no clipping (latents), no noise at the last step. The tables are float64
numpy; they are cast to the dtype of x when used.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from promoe_ds.diffusion import Objective


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM linear schedule, rescaled so that any T spans the same range as T = 1000 (ADM)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced indices of 0..T-1, both ends kept (ADM ``space_timesteps(T, "steps")``)."""
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"ddpm sampling steps must be in [2, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of a Gaussian integrated over the bin [x - 1/255, x + 1/255] (DDPM Eq. 13); the edge bins
    x < -0.999 and x > 0.999 extend to -inf / +inf. Exact normal CDF (ADM uses a tanh approximation)."""
    inv_std = torch.exp(-log_scales)
    upper, lower = inv_std * (x - means + 1 / 255), inv_std * (x - means - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def split_output(model_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, v) from the learned-sigma model output [B, 2C, ...], in x's dtype."""
    if model_out.shape[1] != 2 * x.shape[1]:
        raise ValueError(f"ddpm needs the learned-sigma output (2C = {2 * x.shape[1]} channels), "
                         f"got {model_out.shape[1]}")
    return model_out.to(x.dtype).chunk(2, dim=1)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal like x, drawn on the generator's device in float32. ``generator`` may be a list of
    generators, one per row, so that a sample depends only on its own generator (not on the batch)."""
    if generator is None:
        return torch.randn(x.shape, device=x.device).to(x.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device).to(x) for g in generator])


class DiffusionProcess:
    """The tables of one (possibly respaced) process; ``timestep_map[i]`` is the original step of index i."""

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray):
        if len(betas) < 2:
            raise ValueError("a diffusion process needs at least 2 steps")
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(timestep_map, dtype=np.float64)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

    @staticmethod
    def _at(arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as a [B, 1, 1, ...] tensor broadcastable against x, in x's dtype and device."""
        return torch.from_numpy(arr).to(device=x.device, dtype=x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced index -> original step, the model's timestep input (float32)."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t].float()

    def q_mean_variance(self, x0, t):
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0, self._at(1.0 - self.alphas_cumprod, t, x0)

    def q_sample(self, x0, t, noise):
        return (self._at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, model_out, x_t, t):
        """Mean and log-variance of p(x_{t-1} | x_t) from the [B, 2C, ...] model output (eps, v)."""
        eps, v = split_output(model_out, x_t)
        frac = (v + 1) / 2

        def at(arr):
            return self._at(arr, t, x_t)

        log_var = frac * at(self.log_betas) + (1 - frac) * at(self.posterior_log_variance_clipped)
        x0_hat = at(self.sqrt_recip_alphas_cumprod) * x_t - at(self.sqrt_recipm1_alphas_cumprod) * eps
        mean, _, _ = self.q_posterior_mean_variance(x0_hat, x_t, t)
        return mean, log_var

    def vb_terms_bpd(self, model_out, x0, x_t, t):
        """L_t per sample in bits/dim: KL to the true posterior for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        mean, log_var = self.p_mean_variance(model_out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


class GaussianDiffusion(Objective):
    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000, vlb_weight: float = 1.0):
        self.num_timesteps, self.vlb_weight = num_timesteps, vlb_weight
        self.process = DiffusionProcess(linear_betas(num_timesteps), np.arange(num_timesteps))
        self._respaced: dict[int, DiffusionProcess] = {}

    def draw_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator)

    def training_losses(self, model_fn, x0, draws):
        proc = self.process
        t, noise = draws["t"].to(x0.device), draws["noise"].to(x0)
        x_t = proc.q_sample(x0, t, noise)
        eps, v = split_output(model_fn(x_t, proc.model_timesteps(t)), x0)
        mse = _mean_flat((noise - eps) ** 2)
        # stop-gradient on the mean: the VLB term trains only the variance channels (iDDPM Sec. 3.1)
        vb = proc.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t) * (self.num_timesteps / 1000.0)
        loss = (mse + self.vlb_weight * vb).mean()
        return {"loss": loss, "mse": mse.mean().detach(), "vlb": vb.mean().detach()}

    def respaced(self, steps: int) -> DiffusionProcess:
        """The process on the kept steps: new betas 1 - abar_k / abar_prev_kept keep abar at every kept step."""
        if steps not in self._respaced:
            keep = space_timesteps(self.num_timesteps, steps)
            abar = self.process.alphas_cumprod[keep]
            betas = 1.0 - abar / np.append(1.0, abar[:-1])
            self._respaced[steps] = DiffusionProcess(betas, np.array(keep))
        return self._respaced[steps]

    @torch.no_grad()
    def sample(self, model_fn, noise, steps, generator=None, progress=False):
        """Ancestral sampling x_{t-1} = mu + exp(log_var / 2) z, z ~ N(0, I), no noise at the last step."""
        proc = self.respaced(steps)
        x = noise
        for i in tqdm(reversed(range(proc.num_timesteps)), total=proc.num_timesteps, disable=not progress, desc="ddpm"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            mean, log_var = proc.p_mean_variance(model_fn(x, proc.model_timesteps(t)), x, t)
            x = mean + torch.exp(0.5 * log_var) * _randn_like(x, generator) if i > 0 else mean
        return x
