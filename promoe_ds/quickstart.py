"""``promoe-ds quickstart``: the whole pipeline on a CPU machine in minutes, no download.

1. toy images: an ImageNet-style folder of class-specific coloured shapes (``data_prep.toy``);
2. a tiny ``AutoencoderKL`` (diffusers) trained on them (300 steps, ~2 minutes): reconstruction + a
   small KL term, the objective of SD's VAE without its perceptual and adversarial terms; its ``scaling_factor`` is
   1 / std of the toy latents (how SD's 0.18215 was chosen), so the model sees unit-variance latents;
3. latent shards with it (``data_prep.encode``);
4. DeepSpeed training of a tiny ProMoE by 2 CPU processes, ep_size 2, ZeRO-2
   (``configs/quickstart.yaml``, started with ``spawn_local`` as torchrun would);
5. export of the EMA weights (``promoe-ds export``);
6. a class-balanced sample grid with CFG (``promoe-ds sample``): column c is class c;
7. class consistency: a classifier fitted on the toy images (logistic regression on colour
   histograms) names the class of each sample; the rate at which it names the class the sample was
   asked for, against 10% for chance, says whether the model learned its classes;
then a summary with the paths, the first and last logged loss and the time of each stage.

Running it again continues where it stopped (each stage is resumable).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
CLASSES, PER_CLASS, IMAGE_SIZE, VAE_STEPS = 10, 64, 64, 300


def tiny_vae(path: Path | None = None, levels: int = 4):
    """A randomly initialised AutoencoderKL with ``levels`` resolution levels (downsampling
    2^(levels-1)), 4 latent channels; saved to ``path`` when given."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16,) + (32,) * (levels - 1),
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=IMAGE_SIZE)
    if path is not None:
        vae.save_pretrained(path)
    return vae


def train_vae(vae, images: torch.Tensor, steps: int, *, batch: int = 32, lr: float = 2e-3, kl_weight: float = 1e-3):
    """Fit ``vae`` to ``images`` ([N, 3, H, W] in [-1, 1]): mean squared reconstruction error of a
    posterior sample plus ``kl_weight`` x KL(posterior || N(0, I)) per image element. Then sets its
    scaling_factor to 1 / std of the images' latent means. Returns the last reconstruction error."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        x = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x, x.flip(3))  # encode stores flips too
        post = vae.encode(x).latent_dist
        mse = F.mse_loss(vae.decode(post.sample(generator=g)).sample, x)
        loss = mse + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            print(f"    step {step:4d}/{steps}  reconstruction mse {mse.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        std = torch.cat([vae.encode(x).latent_dist.mean for x in images.split(64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return mse.item()


def _toy_images(train_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All toy pictures, center-cropped as the encoder crops them: uint8 [N, S, S, 3], labels [N]."""
    from PIL import Image

    from data_prep.encode import center_crop_arr

    files = sorted(train_dir.glob("*/*.JPEG"))
    images = np.stack([center_crop_arr(Image.open(f).convert("RGB"), IMAGE_SIZE) for f in files])
    return images, np.array([int(f.parent.name[1:]) for f in files])  # toy class folders are n<class index>


def colour_histogram(images: np.ndarray, bins: int = 4) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, bins^3]: the joint RGB histogram of the picture average-pooled to
    16 x 16 (the pooling makes a sharp picture and a blurred one of the same shapes look alike)."""
    x = F.adaptive_avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 16)
    q = (x.clamp(0, 255) * bins / 256).long().clamp(max=bins - 1)
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    return torch.stack([torch.bincount(c.flatten(), minlength=bins ** 3) for c in cell]).float() / cell[0].numel()


class ToyClassifier:
    """Multinomial logistic regression (L-BFGS, small L2 penalty) on standardised colour histograms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int = CLASSES, l2: float = 1e-3):
        f = colour_histogram(images)
        self.mean, self.std = f.mean(0), f.std(0) + 1e-6
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(f.shape[1], num_classes)
        x, y = (f - self.mean) / self.std, torch.from_numpy(labels).long()
        opt = torch.optim.LBFGS(self.linear.parameters(), max_iter=300)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self.linear(x), y) + l2 * self.linear.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.linear((colour_histogram(images) - self.mean) / self.std).argmax(1).numpy()


def class_consistency(train_dir: Path, samples_npz: Path, held_out: int = 20) -> dict:
    """Fit ``ToyClassifier`` on the toy training pictures; ``rate``: the fraction of samples it assigns
    to the class they were generated for; ``classifier_rate``: its accuracy on ``held_out`` fresh toy
    pictures per class (another seed), the best a perfect generator could score."""
    from data_prep.toy import toy_image

    clf = ToyClassifier(*_toy_images(train_dir))
    fresh = np.stack([np.asarray(toy_image(c, np.random.default_rng([1, c, i]), IMAGE_SIZE))[:IMAGE_SIZE, :IMAGE_SIZE]
                      for c in range(CLASSES) for i in range(held_out)])
    fresh_labels = np.repeat(np.arange(CLASSES), held_out)
    with np.load(samples_npz) as f:
        images, asked = f["arr_0"], f["arr_1"]
    named = clf.predict(images)
    return {"rate": float((named == asked).mean()), "predicted": named, "asked": asked,
            "classifier_rate": float((clf.predict(fresh) == fresh_labels).mean())}


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}/7] {title}", flush=True)
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
         sample_steps: int = 50, vae_steps: int = VAE_STEPS) -> dict:
    """``steps``: training steps (default: the config's); ``per_class`` toy images per class;
    ``sample_steps``: Euler steps of the final samples; ``vae_steps``: autoencoder training steps."""
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

    t = _stage(2, f"tiny AutoencoderKL trained on the toy images, {vae_steps} steps -> {vae_dir}")
    if not (vae_dir / "config.json").is_file():
        vae = tiny_vae()
        images = torch.from_numpy(_toy_images(toy_dir / "train")[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
        train_vae(vae, images, vae_steps)
        vae.save_pretrained(vae_dir)
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

    t = _stage(7, "class consistency: a classifier fitted on the toy images names each sample's class")
    check = class_consistency(toy_dir / "train", result["npz"])
    hits = " ".join(f"{c}:{int((check['predicted'][check['asked'] == c] == c).sum())}" for c in range(CLASSES))
    print(f"    samples of the class asked for: {check['rate']:.0%} (chance {1 / CLASSES:.0%}; the classifier "
          f"on fresh toy pictures: {check['classifier_rate']:.0%})\n"
          f"    per class (of {len(check['asked']) // CLASSES}): {hits}", flush=True)
    times["check"] = time.time() - t

    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    total = time.time() - t_start
    print(f"\nquickstart done in {total / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})\n"
          f"  loss         {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last)\n"
          f"  classes      {check['rate']:.0%} of the samples show the class asked for (chance {1 / CLASSES:.0%})\n"
          f"  checkpoints  {run_dir / 'checkpoints'}\n"
          f"  weights      {weights}\n"
          f"  grid         {result['grid']}  (column c: class c)\n"
          f"  samples      {result['npz']}\n"
          f"next: promoe-ds sample --weights {weights} --num-samples 16 --cfg-scale 1.5 --out {out / 'more'}",
          flush=True)
    return {"grid": result["grid"], "weights": weights, "losses": losses, "seconds": total, "times": times,
            "class_rate": check["rate"], "classifier_rate": check["classifier_rate"],
            "predicted": check["predicted"], "asked": check["asked"]}
