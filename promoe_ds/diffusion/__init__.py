"""Diffusion objectives: rectified flow (``flow.py``) and ADM/DiT Gaussian diffusion (``ddpm.py``).

Both implement one interface so the trainer and the sampler never branch on the objective:

- ``draw(batch, latent_shape, generator)``: ALL randomness of one training step, on CPU, from one
  generator: ``{"noise": [B, C, H, W], "t": [B]}``. The trainer draws each sample of the global batch
  from its own generator (``train.step_draws``), so a step is the same whatever the world size.
- ``training_losses(model_fn, x0, draws)``: ``model_fn(x_t, t_model) -> [B, 2C, H, W]`` (learned-sigma
  layout, the first C channels are the prediction); returns ``{"loss": scalar, ...detached logs}``.
- ``sample(model_fn, noise, steps, generator=None, progress=False)``: x_T = noise -> x_0, deterministic
  given (noise, generator). The caller applies CFG inside ``model_fn``.

Model timestep inputs are float32 tensors [B]: ``1000 * sigma`` for flow, the (original, un-respaced)
step index for DDPM. No model or DeepSpeed imports here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Objective(ABC):
    """Base class: the shared noise draw; subclasses define ``name``, the timestep draw and the rest."""

    name: str

    def draw(self, batch: int, latent_shape: tuple, generator: torch.Generator) -> dict[str, torch.Tensor]:
        noise = torch.randn((batch, *latent_shape), generator=generator)
        return {"noise": noise, "t": self.draw_t(batch, generator)}

    @abstractmethod
    def draw_t(self, batch: int, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def training_losses(self, model_fn, x0: torch.Tensor, draws: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def sample(self, model_fn, noise: torch.Tensor, steps: int, generator=None,
               progress: bool = False) -> torch.Tensor: ...


def build_objective(cfg) -> Objective:
    """``cfg``: ``promoe_ds.config.ObjectiveConfig``."""
    if cfg.name == "flow":
        from promoe_ds.diffusion.flow import RectifiedFlow
        return RectifiedFlow(shift=cfg.shift, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    if cfg.name == "ddpm":
        from promoe_ds.diffusion.ddpm import GaussianDiffusion
        return GaussianDiffusion(num_timesteps=cfg.diffusion_steps, vlb_weight=cfg.vlb_weight)
    raise ValueError(f"objective.name: {cfg.name!r} is not one of flow, ddpm")
