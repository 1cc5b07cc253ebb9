"""Encode an ImageNet-style folder into WebDataset shards of VAE posterior latents.

    python -m data_prep.encode --data IMAGENET/train --out SHARDS [--vae stabilityai/sd-vae-ft-ema]
    accelerate launch -m data_prep.encode --data ... --out ...       # one process per GPU
    python -m data_prep.encode ... --shard-range 0:100                # e.g. one Slurm array task
    python -m data_prep.encode --out SHARDS --finalize-only           # merge records -> manifest

Class index = position of the wnid folder in sorted order (``classes.json``). Each image gets the ADM
center crop and is encoded together with its horizontal flip. One sample per image (key = global
image index): ``mean.npy`` and ``logvar.npy`` float16 ``[2, C, H/8, W/8]`` (view 0 = image, view 1 =
flip), ``cls`` (class index) and ``src`` (path relative to --data).

The sorted image list is cut into fixed shards of --shard-size images; each process takes every
n-th shard of its range. A shard is written to ``shard-XXXXXX.tar.tmp``, renamed, then recorded in
``records/shard-XXXXXX.json``; recorded shards are skipped on restart, so a killed run is resumed
by running the same command again. Whichever process finishes last (every shard recorded) writes
``manifest.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from promoe_ds.config import ConfigError, run_command
from promoe_ds.data import FORMAT, MANIFEST

IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SCALE = 0.18215


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def list_images(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class folders and (relative path, class index) of every image, in a fixed order."""
    if not root.is_dir():
        raise ConfigError(f"--data {root} is not a directory")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    items = []
    for label, wnid in enumerate(classes):
        names = sorted(f.name for f in os.scandir(root / wnid) if Path(f.name).suffix.lower() in IMAGE_EXTS)
        items += [(f"{wnid}/{name}", label) for name in names]
    if not items:
        raise ConfigError(f"no images under {root}/<class>/ (expected an ImageNet-style train folder)")
    return classes, items


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM center crop: halve (BOX) while the short side is >= 2*size, BICUBIC-resize the short side
    to size, then cut the central size x size square. Returns uint8 [size, size, 3]."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, cropped uint8 array or None, error message)."""

    def __init__(self, root: Path, items: list[tuple[str, int]], size: int):
        self.root, self.items, self.size = root, items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            with Image.open(self.root / self.items[i][0]) as img:
                return i, center_crop_arr(img.convert("RGB"), self.size), ""
        except Exception as e:  # unreadable or corrupt image: reported and skipped by the caller
            return i, None, f"{type(e).__name__}: {e}"


def load_vae(name: str, device, dtype):
    from diffusers import AutoencoderKL

    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"--vae {name}: no such directory")
    try:
        vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"cannot load the VAE {name!r} ({reason}); without network access pass a "
                          f"local directory (hub snapshot or AutoencoderKL.save_pretrained) to --vae") from None
    return vae.to(device).eval()


@torch.inference_mode()
def encode_views(vae, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, H, W, 3] -> posterior (mean, logvar), float16 [n, 2, C, h, w]; view 1 = horizontal flip."""
    n = len(images)
    x = images.to(vae.device).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.cat([x, x.flip(3)]).to(vae.dtype)
    post = vae.encode(x).latent_dist

    def views(t):
        return t.unflatten(0, (2, n)).transpose(0, 1).to(torch.float16).cpu().numpy()

    return views(post.mean), views(post.logvar)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_shard(path: Path, samples) -> dict:
    """Write sample dicts (``__key__``, ``mean.npy``, ``logvar.npy``, ``cls``, ``src``) to ``path``
    via ``path.tmp`` and a rename; byte-reproducible (mtime 0). Returns its manifest entry."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    os.replace(tmp, path)
    return {"name": path.name, "samples": count, "sha256": _sha256(path), "bytes": path.stat().st_size}


def write_manifest(out: Path, shards: list[dict], *, vae: str, image_size: int, scale_factor: float,
                   latent_shape, num_classes: int, skipped: list[dict]) -> dict:
    manifest = {
        "format": FORMAT, "vae": vae, "image_size": image_size, "scale_factor": scale_factor,
        "latent_shape": list(latent_shape), "dtype": "float16", "views": ["original", "hflip"],
        "num_classes": num_classes, "total_samples": sum(s["samples"] for s in shards),
        "skipped": {"count": len(skipped), "images": skipped}, "shards": shards,
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


def finalize(out: Path) -> dict | None:
    """Merge ``records/*.json`` into ``manifest.json``; None while shards are still missing."""
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("shard-*.json"))]
    if not records:
        raise ConfigError(f"no shard records under {out / 'records'}; run the encoder first")
    config = records[0]["config"]
    if any(r["config"] != config for r in records):
        raise ConfigError(f"records under {out / 'records'} come from different encoder settings")
    done = {r["shard"]["name"] for r in records}
    missing = [shard_name(i) for i in range(config["shards"]) if shard_name(i) not in done]
    if missing:
        print(f"{len(missing)} of {config['shards']} shards not done yet (e.g. {missing[0]}); "
              f"the manifest is written when all are (or run --finalize-only then)")
        return None
    shapes = {tuple(r["latent_shape"]) for r in records if r["latent_shape"]}
    if len(shapes) != 1:
        raise ConfigError(f"records disagree on (or lack) the latent shape: {shapes}")
    classes = json.loads((out / "classes.json").read_text())
    manifest = write_manifest(out, [r["shard"] for r in records], vae=config["vae"], image_size=config["image_size"],
                              scale_factor=records[0]["scale_factor"], latent_shape=shapes.pop(),
                              num_classes=len(classes), skipped=[s for r in records for s in r["skipped"]])
    print(f"manifest: {manifest['total_samples']} samples in {len(records)} shards, "
          f"{manifest['skipped']['count']} images skipped -> {out / MANIFEST}")
    return manifest


def _record(out: Path, i: int) -> Path:
    return out / "records" / shard_name(i).replace(".tar", ".json")


def _done(out: Path, i: int, config: dict) -> bool:
    if not _record(out, i).is_file():
        return False
    r = json.loads(_record(out, i).read_text())
    if r["config"] != config:
        raise ConfigError(f"{_record(out, i)} was written with other settings or another image list "
                          f"({r['config']} != {config}); use a fresh --out")
    shard = out / r["shard"]["name"]
    return shard.is_file() and shard.stat().st_size == r["shard"]["bytes"]


def encode_shards(args, items, todo: list[int], config: dict, device, dtype, progress: bool) -> tuple[int, int, float]:
    """Encode and write the shards ``todo``; returns (images encoded, images skipped, seconds)."""
    vae = load_vae(args.vae, device, dtype)
    scale = getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE
    plan = []  # per shard: its batches of image indices
    for i in todo:
        idx = range(i * args.shard_size, min((i + 1) * args.shard_size, len(items)))
        plan.append([list(idx[j:j + args.batch_size]) for j in range(0, len(idx), args.batch_size)])
    t0, encoded, skipped_total = time.time(), 0, 0
    loader = iter(torch.utils.data.DataLoader(ImageFiles(args.data, items, args.image_size), collate_fn=list,
                                              batch_sampler=[b for shard in plan for b in shard],
                                              num_workers=args.workers))
    bar = tqdm(total=sum(len(b) for shard in plan for b in shard), unit="img", disable=not progress)
    for i, shard_batches in zip(todo, plan):
        skipped, shapes = [], set()

        def samples(shard_batches, skipped, shapes):
            for _ in shard_batches:
                batch = next(loader)
                for j, _, err in batch:
                    if err:
                        skipped.append({"path": items[j][0], "error": err})
                        tqdm.write(f"skipping {args.data / items[j][0]}: {err}")
                good = [(j, arr) for j, arr, _ in batch if arr is not None]
                if good:
                    mean, logvar = encode_views(vae, torch.from_numpy(np.stack([arr for _, arr in good])))
                    shapes.add(mean.shape[2:])
                    for k, (j, _) in enumerate(good):
                        yield {"__key__": f"{j:08d}", "mean.npy": mean[k], "logvar.npy": logvar[k],
                               "cls": items[j][1], "src": items[j][0]}
                bar.update(len(batch))

        shard = write_shard(args.out / shard_name(i), samples(shard_batches, skipped, shapes))
        _write_json(_record(args.out, i), {"config": config, "shard": shard, "skipped": skipped, "scale_factor": scale,
                                           "latent_shape": list(shapes.pop()) if shapes else None})
        encoded += shard["samples"]
        skipped_total += len(skipped)
    bar.close()
    return encoded, skipped_total, time.time() - t0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        if (value := int(text)) >= 1:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="ImageNet-style folder: DATA/<wnid>/*.JPEG")
    p.add_argument("--out", type=Path, required=True, help="output folder for shards, records and manifest.json")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id or local AutoencoderKL directory")
    p.add_argument("--image-size", type=positive_int, default=256, help="center-crop size in pixels (ADM)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per VAE forward (x2 with the flips)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 otherwise")
    p.add_argument("--device", default="auto", help="auto: this process's accelerate device")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--shard-range", default="", metavar="A:B", help="only shards A..B-1 (e.g. a Slurm array task)")
    p.add_argument("--finalize-only", action="store_true", help="only merge the shard records into manifest.json")
    args = p.parse_args(argv)
    if not args.finalize_only and args.data is None:
        p.error("--data is required")
    if Path(args.vae).expanduser().is_dir():  # a local VAE: recorded (manifest, exports) as an absolute path, so
        args.vae = str(Path(args.vae).expanduser().resolve())  # sampling finds it from any directory
    return args


def main(argv=None) -> None:
    from accelerate import PartialState

    args = parse_args(argv)
    if args.finalize_only:
        if finalize(args.out) is None:
            raise SystemExit(1)
        return
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())  # cpu: gloo across processes
    device = state.device if args.device == "auto" else torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    classes, items = list_images(args.data)
    n_shards = math.ceil(len(items) / args.shard_size)
    try:
        a, _, b = args.shard_range.partition(":")
        lo, hi = int(a or 0), min(int(b or n_shards), n_shards)
    except ValueError:
        raise ConfigError(f"--shard-range {args.shard_range!r} is not of the form A:B") from None
    mine = list(range(lo, hi))[state.process_index::state.num_processes]
    config = {"vae": args.vae, "image_size": args.image_size, "shard_size": args.shard_size, "dtype": str(dtype),
              "images": len(items), "shards": n_shards,
              "list_sha256": hashlib.sha256("\n".join(p for p, _ in items).encode()).hexdigest()}
    (args.out / "records").mkdir(parents=True, exist_ok=True)
    _write_json(args.out / "classes.json", {wnid: i for i, wnid in enumerate(classes)})
    todo = [i for i in mine if not _done(args.out, i, config)]
    encoded, skipped, seconds = 0, 0, 0.0
    if todo:
        encoded, skipped, seconds = encode_shards(args, items, todo, config, device, dtype, state.is_local_main_process)
    print(f"[process {state.process_index}/{state.num_processes}] {encoded} images encoded (x2 views), "
          f"{skipped} skipped, in {seconds:.1f}s = {encoded / max(seconds, 1e-9):.1f} img/s; "
          f"{len(todo)} shards written, {len(mine) - len(todo)} already complete")
    finalize(args.out)  # the last process to finish writes the manifest: no barrier, ranks may end hours apart


if __name__ == "__main__":
    sys.exit(run_command(main))
