"""ali-vilab/ProMoE's sampling procedure (sample.py at commit 5915b31e00f80262534baf552845fa21e03aced0), written
out as an independent reference for promoe-ds' flow sampler (tests/test_sample.py) and as the baseline of
bench/sample_speed.py. Not the authors' code: the procedure their script follows, step by step.

- diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=<trained shift>);
- ``steps`` sigmas linspace(1, 0, steps + 1)[:-1], shifted by ``sample_shift``, handed to
  ``set_timesteps(sigmas=...)``, which shifts them again by the scheduler's ``shift`` (float32), appends 0
  and sets timesteps = 1000 sigma;
- each step: the model at (x, timestep, y); with a scale above 1 only, a second pass with the null label
  and u + s (c - u) over every output channel; the first half of the channels is the velocity;
  ``scheduler.step``: x + (sigma_next - sigma) v.

This path of the scheduler is the same in diffusers 0.32.2 (the authors' pinned version) and 0.42.1.
"""
import numpy as np
import torch


def authors_flow_sampler(model, noise, y, steps, cfg_scale, shift=1.0, sample_shift=1.0):
    """Latents x_0 from ``noise`` [B, C, H, W] and labels ``y`` [B]; ``model(x, t, y)[0]`` is [B, 2C, H, W]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s = np.linspace(1, 0, steps + 1)[:steps]
    scheduler.set_timesteps(sigmas=sample_shift * s / (1 + (sample_shift - 1) * s), device=noise.device)
    x, null = noise, torch.full_like(y, model.num_classes)
    for t in scheduler.timesteps:
        timestep = torch.stack([t] * len(x))
        out = model(x, timestep, y)[0]
        if cfg_scale > 1.0:
            uncond = model(x, timestep, null)[0]
            out = uncond + cfg_scale * (out - uncond)
        x = scheduler.step(out.chunk(2, dim=1)[0], t, x, return_dict=False)[0]
    return x
