"""``promoe-ds import``: the authors' released checkpoints as promoe-ds weight files.

Two sources, recognised by their state-dict keys (those of the public model code):

- ali-vilab/ProMoE ``ckpt_step_*.pth``: ``{model_state_dict, ema_model_state_dict, optimizer_state_dict, step}``
  of ``models_ProMoE_TC.py`` (token choice), ``models_ProMoE_EC.py`` (expert choice: the same tensors, so the
  router is an option) or ``models_DiT.py`` (dense). Their train.py: rectified flow, x_t = (1 - sigma) x0 +
  sigma noise, velocity target noise - x0, timestep 1000 sigma, sigma logit-normal(0, 1) with shift 1, labels
  dropped with probability 0.1; latents of sd-vae-ft-mse scaled by 0.18215.
- facebookresearch/DiT ``DiT-XL-2-256x256.pt`` / ``DiT-XL-2-512x512.pt``: a bare state dict (EMA weights);
  DDPM, 1000 steps, linear betas, learned sigma; their sampler decodes with sd-vae-ft-ema (0.18215).

Their names -> promoe-ds':

    x_embedder.proj.{weight,bias}                  x_embedder.{weight,bias}        (patch embedding conv)
    y_embedder.embedding_table.weight              y_embedder.weight               (row num_classes: null class)
    pos_embed                                      none: checked to be the fixed sin-cos embedding, DiT's layout
    blocks.i.mlp.experts.j.{up,down}_proj.*        blocks.i.mlp.routed_experts.{w1,b1,w2,b2}[j]  (j < R routed)
                                                   blocks.i.mlp.uncond_experts.*[0]              (j = R)
    blocks.i.mlp.shared_expert.{up,down}_proj.*    blocks.i.mlp.shared_experts.*[0]
    blocks.i.mlp.cluster_centers                   blocks.i.mlp.prototypes        (Eq. 4's prototypes)
    every other tensor (t_embedder, attn, adaLN_modulation, dense mlp.fc1/fc2, final_layer): the same name.

Their MoE layers route as promoe-ds' ``promoe`` router (Eq. 4 cosine without scale, identity activation, top-k
scores as gates without renormalisation; null-label tokens to the last expert with gate 1) and ``promoe_ec``
with ``moe.ec_group=sample`` (each expert takes floor(S / E * k) of every conditional sample's S tokens).
Not in the tensors: the attention heads (the DiT size of that depth and width, else ``--num-heads``), token
or expert choice (``--router``) and top-k (``--top-k``; 1 for the released models).
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

import promoe_ds
from promoe_ds.config import ConfigError, ModelConfig, load_config, to_dict
from promoe_ds.export import WEIGHTS, model_shapes, write_safetensors
from promoe_ds.models.dit import sincos_pos_embed
from promoe_ds.models.presets import PRESETS

PROMOE_KEYS = {"ema": "ema_model_state_dict", "model": "model_state_dict"}  # --weights -> ckpt_step_*.pth key
ROUTERS = ("promoe", "promoe_ec")
# their training settings (train.py / config.py / configs/*.yaml; DiT: train.py, sample.py)
PROMOE_OBJECTIVE = dict(name="flow", shift=1.0, logit_mean=0.0, logit_std=1.0, class_dropout=0.1)
DIT_OBJECTIVE = dict(name="ddpm", diffusion_steps=1000, class_dropout=0.1)
PROMOE_VAE, DIT_VAE, SCALE_FACTOR = "stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema", 0.18215
# their SparseMoeBlock settings of the released models (configs/004_ProMoE_*.yaml)
PROMOE_MOE = dict(activation="identity", alpha=1.0, rcl_weight=1.0, rcl_tau=0.07, rcl_assign="topk", lb_weight=0.0)

_EXPERT = re.compile(r"^blocks\.(\d+)\.mlp\.(?:experts\.(\d+)|shared_expert)\.(up|down)_proj\.(weight|bias)$")
_PART = {("up", "weight"): "w1", ("up", "bias"): "b1", ("down", "weight"): "w2", ("down", "bias"): "b2"}
_RENAME = (("x_embedder.proj.", "x_embedder."), ("y_embedder.embedding_table.", "y_embedder."))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=path.stat().st_size < 1 << 28) as bar:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def read_source(path: Path, weights: str) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict, "promoe" | "dit", {step}) of an official checkpoint, memory-mapped: an XL file's tensors are
    read from disk when converted, never all held twice."""
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} is {'a directory' if path.is_dir() else 'absent'}: give the checkpoint file "
                          f"(ckpt_step_*.pth of ali-vilab/ProMoE, DiT-XL-2-*.pt of facebookresearch/DiT)")
    hint = "give a checkpoint of ali-vilab/ProMoE (ckpt_step_*.pth) or facebookresearch/DiT (DiT-XL-2-*.pt)"
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{str(path)!r} is not a torch.save archive (truncated, corrupt or another format): {hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise ConfigError(f"cannot read {str(path)!r} ({str(e).splitlines()[0]}): {hint}") from None
    if isinstance(obj, dict) and all(k in obj for k in PROMOE_KEYS.values()):
        return dict(obj[PROMOE_KEYS[weights]]), "promoe", {"step": obj.get("step")}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if weights != "ema":
            raise ConfigError(f"--weights {weights}: {str(path)!r} is a bare state dict (facebookresearch/DiT's "
                              "released EMA weights), it holds no other")
        return obj, "dit", {}
    what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
    raise ConfigError(f"{str(path)!r} holds {what}, neither {{{', '.join(PROMOE_KEYS.values())}, ...}} "
                      f"(ali-vilab/ProMoE) nor a state dict of tensors (facebookresearch/DiT): {hint}")


def _need(state: dict, key: str, kind: str) -> torch.Tensor:
    if key not in state:
        source = {"promoe": "ali-vilab/ProMoE checkpoint's", "dit": "bare"}[kind]
        raise ConfigError(f"the {source} state dict has no {key!r}: not a DiT / ProMoE model of the public code "
                          f"(its keys: {', '.join(sorted(state)[:4])}, ...)")
    return state[key]


def model_config(state: dict, kind: str, *, router: str, top_k: int, num_heads: int | None) -> ModelConfig:
    """The promoe-ds model of an official state dict, read from its tensors' shapes (ConfigError if none fits)."""
    d, c, p, _ = _need(state, "x_embedder.proj.weight", kind).shape
    tokens = _need(state, "pos_embed", kind).shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ConfigError(f"pos_embed has {tokens} positions, not a square grid")
    depth = 1 + max((int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out = _need(state, "final_layer.linear.weight", kind).shape[0] // (p * p)
    if out not in (c, 2 * c):
        raise ConfigError(f"final_layer.linear.weight has {out * p * p} rows: neither {c} nor {2 * c} channels "
                          f"of {p}x{p} patches")
    if any(".q_norm." in k or ".k_norm." in k for k in state):
        raise ConfigError("the state dict has q_norm / k_norm tensors: models with qk_norm are not imported (their "
                          "LayerNorm's eps 1e-5 is not promoe-ds' 1e-6)")
    sizes = {(s["depth"], s["hidden_size"]): s["num_heads"] for s in PRESETS.values()}
    heads = num_heads or sizes.get((depth, d))
    if heads is None:
        raise ConfigError(f"depth {depth} and width {d} are no preset's size (DiT-S, B, L, XL, ...): give the "
                          f"attention heads with --num-heads")
    fields = dict(input_size=grid * p, in_channels=c, patch_size=p, depth=depth, hidden_size=d, num_heads=heads,
                  num_classes=_need(state, "y_embedder.embedding_table.weight", kind).shape[0] - 1,
                  learn_sigma=out == 2 * c, pos_embed="dit", moe=_moe_fields(state, depth, d, router, top_k))
    dense = [i for i in range(depth) if f"blocks.{i}.mlp.fc1.weight" in state]
    if dense:
        fields["mlp_ratio"] = state[f"blocks.{dense[0]}.mlp.fc1.weight"].shape[0] / d
    fields["preset"] = _preset_name(fields)
    try:
        return load_config(None, {"model": fields}).model
    except ConfigError as e:
        raise ConfigError(f"the state dict's shapes give no valid model ({e})") from None


def _moe_fields(state: dict, depth: int, d: int, router: str, top_k: int) -> dict:
    """model.moe of the MoE layers found: which blocks, routed / shared / unconditional experts, their width."""
    moe = [i for i in range(depth) if f"blocks.{i}.mlp.cluster_centers" in state]
    if not moe:
        return dict(router="none")
    every = moe[0] + 1
    if moe != [i for i in range(depth) if i % every == every - 1]:
        raise ConfigError(f"MoE layers in blocks {moe}: no model.moe.every puts them there (every other block: 1, 3, "
                          f"...; every block: 0, 1, ...)")
    layer = f"blocks.{moe[0]}.mlp"
    routed = state[f"{layer}.cluster_centers"].shape[0]
    experts = len({k for k in state if k.startswith(f"{layer}.experts.") and k.endswith(".up_proj.weight")})
    shared = int(f"{layer}.shared_expert.up_proj.weight" in state)
    if experts not in (routed, routed + 1):
        raise ConfigError(f"{layer} has {experts} experts for {routed} prototypes (cluster_centers): expected "
                          f"{routed} routed experts and at most one unconditional one")
    width = _need(state, f"{layer}.experts.0.up_proj.weight", "promoe").shape[0]
    return dict(router=router, every=every, experts=f"E{experts + shared}A{top_k}S{shared}U{experts - routed}",
                expert_mlp_ratio=width / d, **({"ec_group": "sample"} if router == "promoe_ec" else {}), **PROMOE_MOE)


def _preset_name(fields: dict) -> str:
    """The preset of these sizes and experts (router and routing settings aside), else "" (a custom model)."""
    for name, preset in PRESETS.items():
        moe = {k: v for k, v in preset["moe"].items() if k in ("experts", "expert_mlp_ratio")}
        if (all(fields[k] == v for k, v in preset.items() if k != "moe")
                and preset["moe"]["router"] == ("none" if fields["moe"]["router"] == "none" else "promoe")
                and all(fields["moe"].get(k) == v for k, v in moe.items())):
            return name
    return ""


def convert(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """promoe-ds' tensors (float32) of an official state dict: every source tensor used, every parameter filled,
    else one ConfigError naming the keys."""
    routed = cfg.moe.spec().routed if cfg.moe.router != "none" else 0
    out, origin, experts = {}, {}, {}
    for key, t in state.items():
        if key == "pos_embed":
            want = torch.from_numpy(sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)).float()
            if t.shape[1:] != want.shape or not torch.allclose(t[0].float(), want, atol=1e-5):
                raise ConfigError("pos_embed is not the fixed 2-D sin-cos embedding in DiT's layout (trained or "
                                  "other position embeddings are not imported)")
            continue
        if m := _EXPERT.match(key):
            block, j, proj, kind = m.groups()
            group, idx = (("shared_experts", 0) if j is None else ("routed_experts", int(j)) if int(j) < routed
                          else ("uncond_experts", int(j) - routed))
            experts.setdefault(f"blocks.{block}.mlp.{group}.{_PART[proj, kind]}", {})[idx] = key
            continue
        name = key.replace(".mlp.cluster_centers", ".mlp.prototypes")
        for theirs, ours in _RENAME:
            name = ours + name[len(theirs):] if name.startswith(theirs) else name
        out[name], origin[name] = t.float(), key
    for name, keys in experts.items():  # stacked in expert order
        shapes = {tuple(state[k].shape) for k in keys.values()}
        if sorted(keys) != list(range(len(keys))) or len(shapes) > 1:
            raise ConfigError(f"{name}: the experts' tensors {', '.join(keys[i] for i in sorted(keys))} do not "
                              f"stack (shapes {sorted(shapes)})")
        out[name] = torch.stack([state[keys[i]].float() for i in range(len(keys))])
        origin[name] = ", ".join(keys[i] for i in range(len(keys)))
    _check(out, origin, cfg)
    return out


def _check(out: dict[str, torch.Tensor], origin: dict[str, str], cfg: ModelConfig) -> None:
    want = model_shapes(cfg)
    unused = sorted(origin[n] for n in out.keys() - want.keys())
    missing = sorted(want.keys() - out.keys())
    wrong = [f"{origin[n]} is {list(out[n].shape)}, the model's {n} {list(want[n])}" for n in want
             if n in out and tuple(out[n].shape) != want[n]]
    if unused or missing or wrong:
        parts = ([f"{len(unused)} unused key(s): {', '.join(unused[:8])}"] if unused else []) + (
            [f"{len(missing)} parameter(s) not filled: {', '.join(missing[:8])}"] if missing else []) + (
            [f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:4])}"] if wrong else [])
        label = cfg.preset or f"depth {cfg.depth}, width {cfg.hidden_size}"
        raise ConfigError(f"the state dict does not fill the {label} model exactly: {'; '.join(parts)}")


def import_checkpoint(src: str | Path, out: str | Path, *, weights: str = "ema", router: str = "promoe",
                      top_k: int = 1, num_heads: int | None = None, vae: str | None = None) -> dict[str, str]:
    """``promoe-ds import``: convert and write atomically; returns the metadata written."""
    src, out = Path(src), Path(out)
    if weights not in WEIGHTS or router not in ROUTERS or top_k < 1 or (num_heads is not None and num_heads < 1):
        raise ConfigError(f"--weights ema|model, --router {'|'.join(ROUTERS)}, --top-k >= 1 and --num-heads >= 1 "
                          f"(got {weights}, {router}, {top_k}, {num_heads})")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; name the .safetensors file to write")
    print(f"reading {src}", file=sys.stderr, flush=True)
    state, kind, info = read_source(src, weights)
    cfg = model_config(state, kind, router=router, top_k=top_k, num_heads=num_heads)
    if cfg.moe.router != "none" and cfg.moe.spec().uncond and cfg.num_classes != 1000:
        raise ConfigError(f"{cfg.num_classes} classes: the public code sends label 1000 to the unconditional "
                          f"expert, which is the null class only with 1000 classes")
    tensors = convert(state, cfg)
    source = ("facebookresearch/DiT models.py" if kind == "dit" else "ali-vilab/ProMoE " + (
        "models_DiT.py" if cfg.moe.router == "none" else
        {"promoe": "models_ProMoE_TC.py", "promoe_ec": "models_ProMoE_EC.py"}[router]))
    objective = load_config(None, {"objective": DIT_OBJECTIVE if kind == "dit" else PROMOE_OBJECTIVE}).objective
    metadata = {
        "config": json.dumps(to_dict(cfg)),
        "objective": json.dumps(to_dict(objective)),
        "weights": weights,
        "promoe_ds_version": promoe_ds.__version__,
        "source": src.name,
        "source_sha256": sha256(src),
        "source_code": source,
        "vae": vae or (DIT_VAE if kind == "dit" else PROMOE_VAE),
        "scale_factor": repr(SCALE_FACTOR),
        **({"step": str(info["step"])} if info.get("step") is not None else {}),
    }
    print(f"writing {out} ({cfg.preset or 'custom'} model, {len(tensors)} tensors)", file=sys.stderr, flush=True)
    write_safetensors(tensors, metadata, out)
    return metadata


def summary(metadata: dict[str, str]) -> str:
    """One line on an imported file: its model, router, objective and VAE."""
    cfg, objective = json.loads(metadata["config"]), json.loads(metadata["objective"])
    router = f", router {cfg['moe']['router']}" if cfg["moe"]["router"] != "none" else ""
    trained = (f"flow (shift {objective['shift']:g})" if objective["name"] == "flow"
               else f"ddpm ({objective['diffusion_steps']} steps, learned sigma)")
    return (f"{cfg['preset'] or 'custom'} model ({metadata['source_code']}){router}, objective {trained}, "
            f"VAE {metadata['vae']}")
