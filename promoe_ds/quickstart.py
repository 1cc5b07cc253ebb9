"""``promoe-ds quickstart``: the whole pipeline on a CPU machine in minutes, no download.

1. toy images: an ImageNet-style folder of class-specific shapes (``data_prep.toy``);
2. a tiny random ``AutoencoderKL`` saved locally, with a near-deterministic encoder (posterior
   log-variance shifted by -10, like a trained VAE's) and its ``scaling_factor`` set to 1 / std of
   the toy latents (how SD's 0.18215 was chosen), so the model sees unit-variance latents;
3. latent shards with it (``data_prep.encode``);
4. DeepSpeed training of a tiny ProMoE by 2 CPU processes, ep_size 2, ZeRO-2
   (``configs/quickstart.yaml``, started with ``spawn_local`` as torchrun would);
5. export of the EMA weights (``promoe-ds export``);
6. a class-balanced sample grid with CFG (``promoe-ds sample``): column c is class c;
then a summary with the paths, the first and last logged loss and the time of each stage.

The VAE is random, so the decoded pictures are textures, not shapes: the run checks the pipeline,
not image quality. Running it again continues where it stopped (each stage is resumable).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
CLASSES, PER_CLASS, IMAGE_SIZE = 10, 64, 64


def tiny_vae(path: Path, levels: int = 4, calibrate_on: torch.Tensor | None = None):
    """A random AutoencoderKL (``levels`` resolution levels: downsampling 2^(levels-1)), saved to
    ``path``. With ``calibrate_on`` (images in [-1, 1], [N, 3, H, W]) its scaling_factor becomes
    1 / std of their latent means."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16,) + (32,) * (levels - 1),
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=IMAGE_SIZE).eval()
    with torch.no_grad():  # posterior std ~ e^-5 of the mean's scale, as in a trained VAE (random: logvar ~ 0)
        vae.quant_conv.bias[vae.config.latent_channels:] -= 10.0
    if calibrate_on is not None:
        with torch.no_grad():
            std = vae.encode(calibrate_on).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path)
    return vae


def _toy_batch(train_dir: Path, n: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from data_prep.encode import center_crop_arr

    files = sorted(train_dir.glob("*/*.JPEG"))
    files = files[:: max(1, len(files) // n)][:n]  # spread over the classes
    arr = np.stack([center_crop_arr(Image.open(f).convert("RGB"), IMAGE_SIZE) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}/6] {title}", flush=True)
    return time.time()


def _train(run_dir: Path, shards: Path, steps: int | None) -> None:
    """2 training ranks; rank 0's log lines are echoed as they come. If a rank fails, the other is
    stopped."""
    from promoe_ds.parallel.launch import spawn_local

    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "promoe_ds.cli", "train", "--config", str(CONFIG), f"data.path={shards}",
            f"train.out_dir={run_dir}", *([f"train.steps={steps}"] if steps else [])]
    procs = spawn_local(2, argv, log_dir=logs, env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    log, pos = logs / "rank0.log", 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            done = all(c is not None for c in codes) or any(codes)  # a failed rank would leave the other hanging
            text = log.read_text(errors="replace") if log.exists() else ""
            for line in text[pos:].splitlines(keepends=True):
                if not line.endswith("\n") and not done:
                    break  # echo whole lines only
                pos += len(line)
                if line.startswith(("step ", "promoe-ds ", "resumed", "error", "Traceback")):
                    print("   ", line.rstrip(), flush=True)
            if done:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"training failed (exit codes {codes}); logs in {logs}:\n{log.read_text()[-3000:]}")


def main(out: str | Path = "runs/quickstart", steps: int | None = None, per_class: int = PER_CLASS,
         sample_steps: int = 50) -> dict:
    """``steps``: training steps (default: the config's); ``per_class`` toy images per class;
    ``sample_steps``: Euler steps of the final samples."""
    from data_prep import encode, toy
    from promoe_ds.cli import build_parser
    from promoe_ds.export import export
    from promoe_ds.sample import main_sample

    out = Path(out).resolve()  # the manifest and the export metadata record the VAE's path
    t_start, times = time.time(), {}
    toy_dir, vae_dir, shards, run_dir = out / "toy", out / "vae", out / "shards", out / "train"
    weights, samples = out / "ema.safetensors", out / "samples"

    t = _stage(1, f"toy images: {CLASSES} classes x {per_class}, {IMAGE_SIZE}px -> {toy_dir}")
    if not (toy_dir / "train").is_dir():
        toy.main(["--out", str(toy_dir), "--classes", str(CLASSES), "--per-class", str(per_class),
                  "--size", str(IMAGE_SIZE)])
    times["toy"] = time.time() - t

    t = _stage(2, f"tiny random AutoencoderKL -> {vae_dir}")
    if not (vae_dir / "config.json").is_file():
        vae = tiny_vae(vae_dir, calibrate_on=_toy_batch(toy_dir / "train", 64))
        print(f"    {sum(p.numel() for p in vae.parameters()) / 1e3:.0f}K params, "
              f"scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    times["vae"] = time.time() - t

    t = _stage(3, f"latent shards -> {shards}")
    encode.main(["--data", str(toy_dir / "train"), "--out", str(shards), "--vae", str(vae_dir), "--image-size",
                 str(IMAGE_SIZE), "--shard-size", "128", "--batch-size", "32", "--workers", "1"])
    times["encode"] = time.time() - t

    t = _stage(4, f"training: 2 CPU processes, ep_size 2, ZeRO-2 ({CONFIG.name}) -> {run_dir}")
    _train(run_dir, shards, steps)
    times["train"] = time.time() - t

    t = _stage(5, f"export (EMA) -> {weights}")
    meta = export(run_dir, weights)
    print(f"    step {meta['step']}, {weights.stat().st_size / 1e6:.1f} MB", flush=True)
    times["export"] = time.time() - t

    t = _stage(6, f"sampling: 100 images, classes 0..9 (one per column), CFG 4.0, {sample_steps} Euler steps "
                  f"-> {samples}")
    shutil.rmtree(samples, ignore_errors=True)  # the weights may have changed since a previous run
    result = main_sample(build_parser().parse_args(
        ["sample", "--weights", str(weights), "--num-samples", "100", "--cfg-scale", "4.0",
         "--steps", str(sample_steps), "--classes", "all", "--seed", "0", "--out", str(samples),
         "--batch-size", "50", "--device", "cpu", "--precision", "fp32"]))
    times["sample"] = time.time() - t

    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    total = time.time() - t_start
    print(f"\nquickstart done in {total / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})\n"
          f"  loss         {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last)\n"
          f"  checkpoints  {run_dir / 'checkpoints'}\n"
          f"  weights      {weights}\n"
          f"  grid         {result['grid']}\n"
          f"  samples      {result['npz']}\n"
          f"next: promoe-ds sample --weights {weights} --num-samples 16 --cfg-scale 1.5 --out {out / 'more'}",
          flush=True)
    return {"grid": result["grid"], "weights": weights, "losses": losses, "seconds": total, "times": times}
