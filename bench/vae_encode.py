"""VAE encoding throughput on one GPU: the sd-vae-ft-ema architecture (random weights), bf16, 256 px.

    python -m bench.vae_encode [--batch-size 64] [--iters 30]

Times ``data_prep.encode.encode_views`` exactly as the encoder calls it: uint8 images on the CPU ->
GPU -> one forward of the images and their flips (2 x batch) -> mean/logvar back as float16 numpy.
One image counts once although two views are encoded. Warm-up iterations first, CUDA synchronised
around the timed loop. Takes well under 2 minutes on an H100.
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL

from data_prep.encode import encode_views

SD_VAE_FT_EMA = {  # config.json of stabilityai/sd-vae-ft-ema
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 256,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="images per call (2x views per forward)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU (or pass --device cpu for a smoke test)")
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_FT_EMA).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    images = torch.randint(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=torch.uint8)
    for _ in range(args.warmup):
        encode_views(vae, images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        mean, _ = encode_views(vae, images)  # returns numpy: the device work is done
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = args.iters * args.batch_size / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"vae_encode: sd-vae-ft-ema arch, {vae.dtype}, {args.image_size}px, batch {args.batch_size} (+flips), "
          f"latents {tuple(mean.shape[2:])}: {rate:.1f} img/s ({2 * rate:.1f} views/s) on {name}")


if __name__ == "__main__":
    main()
