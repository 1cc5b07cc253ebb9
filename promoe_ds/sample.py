"""``promoe-ds sample``: class-conditional images from an exported weights file.

The objective comes from the file's metadata: rectified flow is integrated with Euler steps from
sigma = 1 to 0 (with the trained shift), DDPM runs ADM's respaced ancestral sampler. Sample ``i``
depends only on ``(seed, i)``: its initial noise (and DDPM's per-step noise) come from generators
seeded by ``(seed, i)``, its class from ``--classes`` (cycled; ``all`` = 0..K-1, class-balanced) or
from a ``(seed, i)``-seeded draw. So any number of ranks produce the same images, and a run that
stopped is resumed by the same command (existing PNGs are skipped).

Classifier-free guidance (Ho & Salimans 2022) with conditional routing (paper Appendix B): with
scale s != 1 each step is ONE forward pass over the doubled batch [x, x] with labels [y, null]; the
null-label half is routed to the unconditional expert(s), the other half by the prototypes, and
the first C output channels become u + s (c - u) (the DDPM variance channels are the conditional
pass's; ``--cfg-channels 3`` guides only the first three, as facebookresearch/DiT's released
numbers do). With s = 1 each step is one pass over the conditional batch (unconditional experts unused).

Rectified flow integrates with the trained shift times ``--sample-shift`` (SD3 shifts compose by
multiplying): ali-vilab/ProMoE's sampler (diffusers' FlowMatchEulerDiscreteScheduler built with the
trained ``shift``, given sigmas already shifted by ``sample_shift``) is this sampler with
``--sample-shift sample_shift`` (docs/reproduce.md). On CUDA with bf16 the model runs under ``torch.compile``
by default (``--compile off``: eager).

Output in ``--out``: ``samples/{i:06d}.png``, ``grid.png`` (the first 100), ``samples.npz`` in the
ADM format FID tools read (``arr_0`` uint8 [N, H, W, 3], ``arr_1`` int64 labels) and
``sample_config.json`` (the settings; a rerun with other settings into the same folder is refused).
Ranks: under torchrun / srun / spawn_local, rank r of W takes the indices i with i % W == r (one
process per GPU); rank 0 writes the npz and grid after a barrier, reading the other ranks' PNGs from
the shared ``--out``. Decoding uses ``diffusers.AutoencoderKL`` on ``latents / scaling_factor``.
"""
from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from promoe_ds.config import ConfigError, load_config
from promoe_ds.data import stable_seed
from promoe_ds.diffusion import build_objective
from promoe_ds.export import load_pretrained, read_metadata
from promoe_ds.models.dit import compile_model
from promoe_ds.parallel.launch import launcher_env

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # DiT's evaluation VAE
GRID_MAX = 100


def parse_classes(text: str, num_classes: int) -> list[int] | None:
    """``""`` -> None (random per sample), ``all`` -> 0..K-1, ``1,2,3`` -> [1, 2, 3]."""
    if not text:
        return None
    if text == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"--classes: {text!r} is not a comma-separated list of class indices or 'all'") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"--classes: {bad[0]} is not a class of this model (0..{num_classes - 1})")
    return classes


def class_labels(indices, classes: list[int] | None, num_classes: int, seed: int) -> torch.Tensor:
    """The label of each global sample index: ``classes`` cycled, or a (seed, i)-seeded draw."""
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in indices], dtype=torch.long)
    return torch.cat([torch.randint(num_classes, (1,),
                                    generator=torch.Generator().manual_seed(stable_seed(seed, "label", i)))
                      for i in indices]).long()


def guided(model, y: torch.Tensor, scale: float, channels: int | None = None):
    """The sampler's ``model_fn(x, t) -> [B, 2C, H, W]`` with classifier-free guidance (Appendix B:
    the unconditional pass uses the null label, so conditional routing sends it to the
    unconditional experts). Scale 1: one conditional pass per call; else one doubled-batch pass.
    The first ``channels`` output channels (default C, the prediction) become u + s (c - u), the
    others are the conditional pass's."""
    if scale == 1.0:
        return lambda x, t: model(x, t, y)[0].float()
    labels = torch.cat([y, torch.full_like(y, model.num_classes)])

    def model_fn(x, t):
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels)[0].float().chunk(2)
        c = channels or x.shape[1]
        return torch.cat([uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)

    return model_fn


def initial_noise(cfg, indices: list[int], seed: int) -> torch.Tensor:
    """x_T [B, C, H, W] of the samples with these global indices (model config ``cfg``), on the CPU."""
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(stable_seed(seed, "noise", i)))
                        for i in indices])


@torch.no_grad()
def generate(model, objective, indices: list[int], labels: torch.Tensor, *, steps: int, cfg_scale: float, seed: int,
             bf16: bool = False, cfg_channels: int | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] (float32) of the samples with these global indices and labels. ``model`` may
    be the model wrapped by ``torch.compile``."""
    device = next(model.parameters()).device
    noise = initial_noise(model.cfg, indices, seed).to(device)
    per_sample = [torch.Generator().manual_seed(stable_seed(seed, "steps", i)) for i in indices]  # DDPM's z
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model_fn = guided(model, labels.to(device), cfg_scale, cfg_channels)
        return objective.sample(model_fn, noise, steps, generator=per_sample).float()


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> np.ndarray:
    """Latents (scaled as in training) -> uint8 [B, H, W, 3] (DiT's rounding of [-1, 1] to pixels)."""
    x = vae.decode(z.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] -> one picture, ceil(sqrt(N)) columns, 2 px white gaps."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = img
    return grid


def _save_png(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)  # a PNG under its final name is always complete: safe to skip on resume


def _init_world() -> tuple[int, int, int]:
    """(rank, world size, local rank); a process group (gloo: only barriers and two counts travel)
    when the launcher started several ranks."""
    rank, world, local = launcher_env()
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=6))
    return rank, world, local


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``--device``: auto (GPU ``local_rank`` if CUDA is available, else the CPU), cpu, cuda or cuda:N;
    ConfigError for a device this machine does not have."""
    if flag == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise ConfigError(f"--device {flag!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA GPU(s) usable by torch "
                          f"{torch.__version__}; use --device cpu or auto")
    return device


def sampling_objective(meta: dict, sample_shift: float = 1.0):
    """The objective config of a weights file's metadata; rectified flow's shift multiplied by
    ``sample_shift``: SD3 shifts compose by multiplying, shift_sigma(shift_sigma(s, a), b) =
    shift_sigma(s, a b), so this is the authors' scheduler ``shift`` applied after their ``sample_shift``."""
    cfg = load_config(None, {"objective": json.loads(meta["objective"])}).objective
    if not (math.isfinite(sample_shift) and sample_shift > 0):
        raise ConfigError(f"--sample-shift must be a finite number > 0, got {sample_shift}")
    if sample_shift != 1.0:
        if cfg.name != "flow":
            raise ConfigError("--sample-shift: only rectified-flow weights have a timestep shift "
                              f"(these are {cfg.name})")
        cfg.shift *= sample_shift
    return cfg


def use_compile(flag: str, device: torch.device, bf16: bool) -> bool:
    """``--compile``: auto = on for CUDA under bf16 (the sampling speed of docs/sampling.md), off elsewhere:
    fp32 sampling is the exact comparison with the authors, and the grouped expert GEMM compiles in bf16 only."""
    return flag == "on" or (flag == "auto" and device.type == "cuda" and bf16)


def _settings(args, meta: dict, vae: str) -> dict:
    """What determines the images; a folder holds the samples of one setting. Options at their default
    are left out, so folders written before an option existed resume. Not recorded: --compile and
    --batch-size (they change bf16 rounding, not the samples' distribution)."""
    extra = {"sample_shift": args.sample_shift} if args.sample_shift != 1.0 else {}
    if args.cfg_channels:
        extra["cfg_channels"] = args.cfg_channels
    return {"weights": str(Path(args.weights).resolve()), "weights_bytes": os.path.getsize(args.weights),
            "step": meta.get("step"), "source": meta.get("source"), "which": meta.get("weights"),
            "cfg_scale": args.cfg_scale, "steps": args.steps, "seed": args.seed, "classes": args.classes, "vae": vae,
            "precision": args.precision, **extra}


def default_out(args) -> Path:
    return Path("samples") / f"{Path(args.weights).stem}-cfg{args.cfg_scale:g}-steps{args.steps}-seed{args.seed}"


def main_sample(args) -> dict:
    """``promoe-ds sample``; returns a summary (rank 0: paths of the npz and grid)."""
    rank, world, local = _init_world()
    meta = read_metadata(args.weights)
    if "objective" not in meta:
        raise ConfigError(f"weights file {args.weights!r} has no 'objective' metadata (flow or ddpm and its settings, "
                          "which the sampler follows): export the checkpoint again with `promoe-ds export`")
    objective_cfg = sampling_objective(meta, args.sample_shift)
    model_cfg = json.loads(meta["config"])
    num_classes = model_cfg["num_classes"]
    classes = parse_classes(args.classes, num_classes)
    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--num-samples, --steps and --batch-size must be >= 1")
    if not math.isfinite(args.cfg_scale):
        raise ConfigError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    channels = model_cfg["in_channels"]
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= channels:
        raise ConfigError(f"--cfg-channels must be in 1..{channels} (the model's latent channels), "
                          f"got {args.cfg_channels}")
    device = resolve_device(args.device, local)
    vae_name = args.vae or meta.get("vae") or DEFAULT_VAE
    out = Path(args.out) if args.out else default_out(args)
    png_dir = out / "samples"
    settings = _settings(args, meta, vae_name)
    record = out / "sample_config.json"
    made = record.is_file() and png_dir.is_dir() and any(png_dir.glob("*.png"))
    if made and json.loads(record.read_text()) != settings:  # checked by every rank
        raise ConfigError(f"--out {str(out)!r} holds samples made with other settings ({record}); use a fresh --out")
    if rank == 0:
        png_dir.mkdir(parents=True, exist_ok=True)
        record.with_name(record.name + ".tmp").write_text(json.dumps(settings, indent=1))
        os.replace(record.with_name(record.name + ".tmp"), record)
    if world > 1:
        dist.barrier()

    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    todo = [i for i in range(rank, args.num, world) if not (png_dir / f"{i:06d}.png").is_file()]
    dt = 0.0
    if todo:
        vae, forward = _load(args, meta, vae_name, device, bf16, rank)
        objective = build_objective(objective_cfg)
        shift = f", shift {objective_cfg.shift:g}" if objective_cfg.name == "flow" else ""
        bar = tqdm(total=len(todo), unit="img", desc=f"sampling ({objective_cfg.name}, {args.steps} steps{shift}, "
                                                     f"cfg {args.cfg_scale:g})", disable=rank != 0)
        t0 = time.time()
        for k in range(0, len(todo), args.batch_size):
            batch = todo[k:k + args.batch_size]
            labels = class_labels(batch, classes, num_classes, args.seed)
            z = generate(forward, objective, batch, labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                         bf16=bf16, cfg_channels=args.cfg_channels)
            for i, img in zip(batch, decode(vae, z)):
                _save_png(img, png_dir / f"{i:06d}.png")
            bar.update(len(batch))
        bar.close()
        dt = time.time() - t0
    new = torch.tensor([len(todo)])
    if world > 1:
        dist.all_reduce(new)  # also the barrier before rank 0 reads every rank's PNGs
        # the last collective: every rank takes the group down itself, before the interpreter exits (left to
        # exit-time destructors, a rank whose peer has gone can abort with "terminate called without an active
        # exception")
        dist.destroy_process_group()
    if rank != 0:
        return {}
    npz, grid, shape = _collect(args, out, classes, num_classes)
    rate = f" ({len(todo) / dt:.2f} img/s on rank 0, {dt:.1f}s)" if todo else ""
    print(f"sampled {int(new)} new images on {world} rank(s){rate}; {args.num} images {shape} -> {npz}, "
          f"grid {grid}", flush=True)
    return {"npz": npz, "grid": grid, "new": int(new), "seconds": dt}


def _load(args, meta: dict, vae_name: str, device: torch.device, bf16: bool, rank: int):
    """(the VAE, the model's forward: compiled or not), checked against each other and the weights' metadata."""
    from data_prep.encode import load_vae  # one VAE loader for encoding and decoding

    vae = load_vae(vae_name, device, torch.float32)  # first: the likelier failure (offline hub id)
    model = load_pretrained(args.weights, device)
    scale = float(meta.get("scale_factor", vae.config.scaling_factor))
    if abs(scale - vae.config.scaling_factor) > 1e-6 * scale:
        raise ConfigError(f"--vae {vae_name!r} has scaling_factor {vae.config.scaling_factor}, but the model was "
                          f"trained on latents scaled by {scale} (metadata of {args.weights})")
    if vae.config.latent_channels != model.cfg.in_channels:
        raise ConfigError(f"--vae {vae_name!r} has {vae.config.latent_channels} latent channels, the model "
                          f"{model.cfg.in_channels}")
    if not use_compile(args.compile, device, bf16):
        return vae, model
    if not bf16 and any(layer.routed_experts.backend == "grouped" for layer in model.moe_layers()):
        raise ConfigError("--compile on: the grouped expert GEMM compiles in bf16 only; use --precision bf16 "
                          "or --compile off")
    if rank == 0:
        print("torch.compile: the first batch compiles (about a minute for the XL presets; --compile off: "
              "eager)", flush=True)
    # static shapes: a rank's last, smaller batch compiles its own graph once instead of making
    # every graph dynamic; the timestep is a tensor input, so no step recompiles
    return vae, compile_model(model, dynamic=False)


def _collect(args, out: Path, classes, num_classes: int) -> tuple[Path, Path, list[int]]:
    """Rank 0, once every rank has written its PNGs: all of them into ``samples.npz`` (images and labels, the
    evaluator's input) and the first ones into ``grid.png``; (their paths, an image's shape)."""
    png_dir = out / "samples"
    missing = [i for i in range(args.num) if not (png_dir / f"{i:06d}.png").is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {args.num} samples are missing in {png_dir} "
                           f"(e.g. {missing[0]:06d}.png); "
                           "rerun the same command to finish them")
    first = np.asarray(Image.open(png_dir / f"{0:06d}.png").convert("RGB"))
    images = np.empty((args.num, *first.shape), np.uint8)
    for i in range(args.num):
        images[i] = np.asarray(Image.open(png_dir / f"{i:06d}.png").convert("RGB"))
    labels = class_labels(range(args.num), classes, num_classes, args.seed).numpy()
    npz, grid = out / "samples.npz", out / "grid.png"
    with open(npz.with_name(npz.name + ".tmp"), "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)
    os.replace(npz.with_name(npz.name + ".tmp"), npz)
    _save_png(image_grid(images[:GRID_MAX]), grid)
    return npz, grid, list(images.shape[1:])
