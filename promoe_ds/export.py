"""One safetensors file per model: consolidate a checkpoint of any layout, and load it back.

``promoe-ds export`` reads only the layout-independent files of a checkpoint tag (``meta.json``,
``promoe/dense.pt`` and the ``promoe/experts_ep<k>.pt`` of every expert-parallel rank, see
checkpoint.py), so a checkpoint written by any world size, ZeRO stage and ep_size consolidates the
same way, on CPU, without a process group. The file holds every parameter under the name it has in
a 1-process model (the routed experts of each layer concatenated in global-expert order), the EMA
weights by default, and string metadata:

- ``config``: the model config (JSON), enough to rebuild the model (``load_pretrained``), the position-embedding
  layout (``pos_embed``) included: a checkpoint that does not record it was trained with the rows-first layout;
- ``objective``: the objective config (JSON: name, shift, diffusion steps, ...) for the sampler;
- ``step``, ``weights`` (ema | model), ``promoe_ds_version``, ``source`` (the tag directory),
  ``train_config`` (the whole training config, for provenance);
- ``vae`` and ``scale_factor`` of the training latents when the data manifest can be read.

``load_into`` fills a model that may hold only its expert-parallel slice of the routed experts
(rows ``first_id : first_id + num`` of each routed tensor): the trainer's ``train.init_from``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import promoe_ds
from promoe_ds.checkpoint import LATEST, META, complete_tags, load_tensors, read_meta
from promoe_ds.config import ConfigError, ModelConfig, model_config_diff, model_config_from_dict, with_recorded_layout
from promoe_ds.models.dit import DiT, build_model
from promoe_ds.models.moe import routed_expert_layer

WEIGHTS = ("ema", "model")


# ---- checkpoint -> tensors ---------------------------------------------------------------------

def find_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """``path`` is a run directory, its ``checkpoints/`` directory or a tag directory; ``tag``
    (default: the one ``latest`` names) picks a tag in the first two cases."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--checkpoint: {str(p)!r} is not a directory")
    if (p / META).is_file() or (p / "promoe").is_dir():  # a tag directory (maybe incomplete)
        if tag and tag not in (LATEST, p.name):
            raise ConfigError(f"--tag {tag}: --checkpoint {str(p)!r} is already a tag directory")
        return p
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tags = complete_tags(ckpt_dir)
    if not tag or tag == LATEST:
        if not (ckpt_dir / LATEST).is_file():
            raise ConfigError(f"--checkpoint: no {LATEST!r} file in {str(ckpt_dir)!r}, so no complete checkpoint "
                              f"to export (complete tags: {', '.join(tags) or 'none'})")
        tag = (ckpt_dir / LATEST).read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise ConfigError(f"--tag: no tag {tag!r} in {str(ckpt_dir)!r} (complete tags: {', '.join(tags) or 'none'})")
    return ckpt_dir / tag


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the 1-process model, from the config alone (meta device)."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in DiT(cfg).named_parameters()}


def consolidate(tag_dir: Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors of the 1-process model, meta.json) of a complete checkpoint tag; ConfigError naming
    what is missing when the tag cannot be fully consolidated, or that the tag was deleted while it was read
    (the retention of a run still training into the directory)."""
    complete = (tag_dir / META).is_file()
    try:
        return _consolidate(tag_dir, weights)
    except ConfigError:
        if (tag_dir / META).is_file() or (tag_dir.is_dir() and not complete):
            raise
        tags = complete_tags(tag_dir.parent)
        raise ConfigError(f"checkpoint {str(tag_dir)!r} was deleted while it was read (a run training into "
                          f"{str(tag_dir.parent)!r} keeps its train.keep_last newest checkpoints): export again "
                          f"(complete tags now: {', '.join(tags) or 'none'})") from None


def _consolidate(tag_dir: Path, weights: str) -> tuple[dict[str, torch.Tensor], dict]:
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    tags = complete_tags(tag_dir.parent)
    if not (tag_dir / META).is_file():
        raise ConfigError(f"checkpoint {str(tag_dir)!r} is incomplete: {META} absent (it is written last, so the "
                          f"job stopped while saving this tag); complete tags: {', '.join(tags) or 'none'}")
    others = [t for t in tags if t != tag_dir.name]
    hint = f"export another tag with --tag (other complete tags: {', '.join(others) or 'none'})"
    meta = read_meta(tag_dir, hint)
    cfg = model_config_from_dict(meta["config"]["model"], f"checkpoint {str(tag_dir)!r}")
    shapes = model_shapes(cfg)
    own = tag_dir / "promoe"
    has_experts = any(map(routed_expert_layer, shapes))
    expert_files = [f"experts_ep{k:04d}.pt" for k in range(meta["ep_size"])] if has_experts else []
    missing = [name for name in ["dense.pt", *expert_files] if not (own / name).is_file()]
    if missing:
        raise ConfigError(f"cannot consolidate {str(tag_dir)!r}: {', '.join(missing)} absent from {str(own)!r} "
                          f"(written with ep_size={meta['ep_size']}: needs dense.pt and "
                          f"{len(expert_files)} expert files experts_ep0000.pt ...)")

    def read(name):  # mmap: an XL-sized checkpoint is not copied into memory twice
        return load_tensors(own / name, hint, mmap=True)

    state = {n: e[weights] for n, e in read("dense.pt").items()}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name in expert_files:
        shard = read(name)
        for n, e in shard["params"].items():
            pieces.setdefault(n, []).append((shard["first_id"][routed_expert_layer(n)], e[weights]))
    for n, parts in pieces.items():  # global-expert order; the slices must tile 0..routed-1
        parts.sort(key=lambda p: p[0])
        starts = [sum(len(t) for _, t in parts[:i]) for i in range(len(parts))]
        if [f for f, _ in parts] != starts:
            raise ConfigError(f"cannot consolidate {str(tag_dir)!r}: the expert files' slices of {n} start at "
                              f"experts {[f for f, _ in parts]}, not {starts}")
        state[n] = torch.cat([t for _, t in parts])
    check_shapes({n: tuple(t.shape) for n, t in state.items()}, shapes, f"checkpoint {str(tag_dir)!r}",
                 "its model config")
    return state, meta


def check_shapes(have: dict[str, tuple], want: dict[str, tuple], what: str, against: str) -> None:
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    wrong = [n for n in want if n in have and have[n] != want[n]]
    if missing or extra or wrong:
        first = (f"{missing[0]} missing" if missing else f"unexpected {extra[0]}" if extra else
                 f"{wrong[0]} is {list(have[wrong[0]])}, {against} has {list(want[wrong[0]])}")
        raise ConfigError(f"{what} does not match {against}: {len(missing)} missing, {len(extra)} unexpected, "
                          f"{len(wrong)} mis-shaped parameters, e.g. {first}")


def latent_info(train_config: dict) -> dict[str, str]:
    """VAE id and latent scale factor of the training data, when its manifest is readable."""
    data = train_config.get("data", {})
    if data.get("source") != "wds":
        return {}
    try:
        from promoe_ds.data import read_manifest

        manifest = read_manifest(Path(data["path"]))
    except (OSError, ValueError):
        return {}
    return {"vae": str(manifest["vae"]), "scale_factor": repr(float(manifest["scale_factor"]))}


def export(checkpoint: str | Path, out: str | Path, tag: str | None = None, weights: str = "ema") -> dict:
    """``promoe-ds export``: consolidate and write atomically (``OUT.tmp`` then rename). Returns the
    metadata written."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; name the file to write, e.g. "
                          f"{str(out / 'ema.safetensors')!r}")
    if blocker := next((p for p in out.parents if p.is_file()), None):
        raise ConfigError(f"--out {str(out)!r}: {str(blocker)!r} is a file, not a directory; choose another --out")
    tag_dir = find_tag_dir(checkpoint, tag)
    state, meta = consolidate(tag_dir, weights)
    train_config = meta["config"]
    metadata = {
        "config": json.dumps(with_recorded_layout(train_config["model"])),  # the position-embedding layout recorded
        "objective": json.dumps(train_config["objective"]),
        "step": str(meta["step"]),
        "weights": weights,
        "promoe_ds_version": promoe_ds.__version__,
        "source": str(tag_dir.resolve()),
        "train_config": json.dumps(train_config),
        **latent_info(train_config),
    }
    write_safetensors(state, metadata, out)
    return metadata


def write_safetensors(state: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file({n: t.contiguous() for n, t in state.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- file -> model -----------------------------------------------------------------------------

def _unreadable(path, e: Exception) -> ConfigError:
    if Path(path).is_dir():
        return ConfigError(f"weights file {str(path)!r} is a directory: pass the .safetensors file in it")
    if not Path(path).exists():
        return ConfigError(f"weights file {str(path)!r} does not exist (write one with `promoe-ds export`)")
    return ConfigError(f"cannot read weights file {str(path)!r}: {e} (truncated, corrupt or not a safetensors file?)")


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
    if "config" not in meta:
        raise ConfigError(f"weights file {str(path)!r} has no 'config' metadata: not written by `promoe-ds export`")
    for key in [k for k in ("config", "objective") if k in meta]:
        try:
            ok = isinstance(json.loads(meta[key]), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"weights file {str(path)!r}: its {key!r} metadata is not a JSON object (corrupt or not "
                              f"written by `promoe-ds export`); export the checkpoint again")
    return meta


@torch.no_grad()
def load_into(model: DiT, path: str | Path) -> dict[str, str]:
    """Copy the weights of an exported file into ``model``, which may hold only a slice of the routed
    experts (expert parallelism); ConfigError if the file's model differs in any shape or in the
    position-embedding layout. Returns the file's metadata."""
    meta = read_metadata(path)
    layout = model_config_from_dict(json.loads(meta["config"]), f"weights file {str(path)!r}").pos_embed
    if layout != model.cfg.pos_embed:
        raise ConfigError(f"weights file {str(path)!r} was trained with model.pos_embed={layout}, this model has "
                          f"{model.cfg.pos_embed}: its outputs would change")
    params = dict(model.named_parameters())
    want, rows = {}, {}  # full (1-process) shape of each parameter; this rank's rows of routed ones
    for name, p in params.items():
        want[name] = tuple(p.shape)
        if layer_name := routed_expert_layer(name):
            layer = model.get_submodule(layer_name)
            want[name] = (layer.spec.routed, *p.shape[1:])
            rows[name] = slice(layer.routed_experts.first_id, layer.routed_experts.first_id + layer.routed_experts.num)
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            have = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118 (safe_open has keys(), no __iter__)
            try:
                check_shapes(have, want, f"weights file {str(path)!r}", "this model")
            except ConfigError as e:
                diff = model_config_diff(json.loads(meta["config"]), model.cfg, "the file")
                raise ConfigError(f"{e}{diff}") from None
            for name, p in params.items():
                p.copy_(f.get_slice(name)[rows[name]] if name in rows else f.get_tensor(name))
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
    return meta


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """The model of an exported file, rebuilt from its metadata alone, in eval mode on ``device``
    with the fastest expert backend for it."""
    cfg = model_config_from_dict(json.loads(read_metadata(path)["config"]), f"weights file {str(path)!r}")
    model = build_model(cfg)
    load_into(model, path)
    device = torch.device(device)
    model.set_expert_backend(cfg.moe.backend, device)
    return model.to(device).eval()
