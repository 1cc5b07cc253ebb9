"""Typed configuration: dataclasses filled from a YAML file plus ``key=value`` overrides.

Every section is a dataclass; unknown keys and impossible values raise ``ConfigError`` with one
message naming the offending key (``model.moe.top_k``), never a traceback from deep inside
DeepSpeed. A model preset (``model.preset: ProMoE-XL``) fills the model fields first; keys given
explicitly in the file or on the command line override it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A configuration mistake, reported as one line naming the key."""


class RunError(Exception):
    """A failure of the run that one line explains (a full disk): ``error: ...`` and exit 1, no traceback."""


_SPEC_RE = re.compile(r"^E(\d+)A(\d+)S(\d+)[UN](\d+)$")


@dataclass(frozen=True)
class ExpertSpec:
    """``E{total}A{k}S{shared}U{uncond}``: total experts = routed + shared + uncond (paper notation,
    ``N`` is accepted for ``U`` as in Tab. 9); ``A`` = top-k among the routed experts."""

    total: int
    top_k: int
    shared: int
    uncond: int

    @property
    def routed(self) -> int:
        return self.total - self.shared - self.uncond

    @classmethod
    def parse(cls, text: str) -> ExpertSpec:
        m = _SPEC_RE.match(text.strip())
        if not m:
            raise ConfigError(f"expert spec {text!r} is not of the form E<total>A<k>S<shared>U<uncond>, e.g. E14A1S1U1")
        spec = cls(*(int(g) for g in m.groups()))
        if spec.routed < 1:
            raise ConfigError(f"expert spec {text!r}: {spec.total} experts minus {spec.shared} shared and "
                              f"{spec.uncond} unconditional leaves {spec.routed} routed experts (need >= 1)")
        if not 1 <= spec.top_k <= spec.routed:
            raise ConfigError(f"expert spec {text!r}: top-k A{spec.top_k} must be between 1 and the "
                              f"{spec.routed} routed experts")
        return spec

    def __str__(self) -> str:
        return f"E{self.total}A{self.top_k}S{self.shared}U{self.uncond}"


@dataclass
class MoEConfig:
    # none: dense MLP; tc: token-choice softmax; ec: expert-choice
    router: Literal["none", "promoe", "promoe_ec", "tc", "ec"] = "none"
    experts: str = "E14A1S1U1"      # ExpertSpec string
    every: int = 2                  # MoE in blocks every-1, 2*every-1, ... (every other block by default)
    expert_mlp_ratio: float = 0.0   # hidden width / D of one expert; 0 = mlp_ratio / (1 + shared)
    alpha: float = 1.0              # Eq. 4 scale
    activation: Literal["identity", "sigmoid", "softmax"] = "identity"  # Eq. 2, prototypical routing
    rcl_weight: float = 1.0         # lambda_RCL (Eq. 6)
    rcl_tau: float = 0.07           # tau (Eq. 6)
    rcl_assign: Literal["topk", "top1"] = "topk"  # topk: a token counts in the mean of each of its k experts
    lb_weight: float = 0.0          # load-balancing loss weight (off for ProMoE, Tab. 12)
    ec_capacity: float = 1.0        # expert-choice: tokens per expert = capacity * k * tokens / routed
    ec_group: Literal["batch", "sample"] = "batch"  # expert choice among the conditional tokens of: the micro-batch
    # | each sample apart (ali-vilab/ProMoE's expert-choice code: a sample's output independent of the batch)
    backend: Literal["auto", "loop", "grouped", "megablocks"] = "auto"  # expert compute (models/experts.py)

    def spec(self) -> ExpertSpec:
        return ExpertSpec.parse(self.experts)


@dataclass
class ModelConfig:
    preset: str = ""
    input_size: int = 32            # latent side (256px / 8)
    in_channels: int = 4
    patch_size: int = 2
    depth: int = 12
    hidden_size: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True        # 8 output channels (flow uses the first 4)
    qk_norm: bool = False
    pos_embed: Literal["dit", "rows_first"] = "dit"  # 2-D sin-cos layout; dit: the first half of the channels: column
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ObjectiveConfig:
    name: Literal["flow", "ddpm"] = "flow"
    shift: float = 1.0              # flow: timestep shift
    logit_mean: float = 0.0         # flow: logit-normal sigma sampling (SD3)
    logit_std: float = 1.0
    diffusion_steps: int = 1000     # ddpm
    vlb_weight: float = 1.0         # ddpm hybrid loss weight of the VLB term (0.001 * T scaling inside)
    class_dropout: float = 0.1      # label -> null class probability (CFG training)


@dataclass
class DataConfig:
    source: Literal["synthetic", "wds"] = "synthetic"
    path: str = ""                  # wds: directory holding manifest.json and shards
    num_workers: int = 2
    shuffle_buffer: int = 2000
    resampled: bool = True


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "promoe-ds"
    name: str = ""
    dir: str = ""


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    global_batch: int = 256
    micro_batch: int = 0            # 0 = derive: global_batch / world_size (grad accumulation 1)
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    seed: int = 0
    ep_size: int = 1
    zero_stage: Literal[0, 1, 2] = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    ds_config: str = ""             # base DeepSpeed json; batch/optimizer/zero keys are filled from here
    log_every: int = 10
    ckpt_every: int = 1000          # 0 = no periodic or final checkpoint (a stop signal still writes one)
    keep_last: int = 3
    resume: str = "auto"            # auto | none | path to a checkpoint tag directory
    init_from: str = ""             # exported .safetensors to start (fine-tune) from
    overwrite: bool = False         # a run from step 0 moves another run's checkpoints in out_dir aside (rundir.py)
    max_bad_steps: int = 10         # abort after this many non-finite losses in a row
    collective_timeout: float = 900.0  # s a rank waits for the others (a collective, a step) before exiting 98
    compile: bool = False
    compile_cache: str = "auto"     # with compile: inductor's cache: auto (<out_dir>/compile_cache), none (its
    #                                 default) or a directory
    cuda_graphs: bool = False       # with compile: replay the compiled forward/backward as CUDA graphs (ep_size 1)
    fused_ema: bool = False         # ZeRO-0: AdamW and the EMA in one compiled pass over the weights (optim.py)
    bf16_weights: bool = False      # with fused_ema, bf16: weights autocast casts stored in bf16, float32 masters
    #                                 in AdamW
    grad_checkpoint: bool = False
    profile_at: int = 0             # profile steps profile_at .. +profile_steps-1 into <out_dir>/profile (0 = off)
    profile_steps: int = 3
    profile_python: bool = False    # the profile also records Python stacks (slower host while profiling)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


_POSITIVE = ("model.input_size", "model.in_channels", "model.patch_size", "model.depth", "model.hidden_size",
             "model.num_heads", "model.num_classes", "model.moe.every", "train.steps", "train.global_batch",
             "train.ep_size", "train.log_every", "train.profile_steps", "train.keep_last", "train.max_bad_steps",
             "train.collective_timeout", "model.moe.rcl_tau", "model.mlp_ratio", "objective.diffusion_steps")
_NON_NEGATIVE = ("train.lr", "train.ckpt_every", "train.profile_at", "train.warmup_steps", "train.micro_batch",
                 "train.grad_clip", "train.weight_decay", "data.num_workers")


def _check_choice(key: str, value, typ) -> None:
    """A ``Literal[...]`` field holds one of its values."""
    choices = typing.get_args(typ) if typing.get_origin(typ) is Literal else None
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _coerce(key: str, value, typ):
    """Convert a YAML / command-line value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is Literal:  # the type of its values (str or int), then one of them
        value = _coerce(key, value, type(typing.get_args(typ)[0]))
        _check_choice(key, value, typ)
        return value
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return str(value)
        if typ is tuple or origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}")


def _leaves(obj, prefix: str):
    """(dotted key, value, declared type) of every field of a config dataclass, sections walked."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, hints[f.name]


def _fill(obj, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = prefix + key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {full!r} (known keys here: {known})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            _fill(getattr(obj, key), value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, typ))


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what it expected, and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(cfg: Config, dotted: str):
    obj = cfg
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> Config:
    for key, value, typ in _leaves(cfg, ""):
        _check_choice(key, value, typ)
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)!r}")
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.input_size % m.patch_size:
        raise ConfigError(f"model.input_size: {m.input_size} is not divisible by model.patch_size={m.patch_size}")
    if m.moe.router != "none":
        spec = m.moe.spec()
        if m.moe.router in ("tc", "ec") and spec.uncond:
            raise ConfigError(f"model.moe.experts: router {m.moe.router!r} has no unconditional experts ({spec})")
    if not 0.0 <= cfg.objective.class_dropout < 1.0:
        raise ConfigError(f"objective.class_dropout: must be in [0, 1), got {cfg.objective.class_dropout}")
    for key in _NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)!r}")
    if not math.isfinite(cfg.train.lr):
        raise ConfigError(f"train.lr: must be finite, got {cfg.train.lr!r}")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"train.betas: must be two numbers in [0, 1), got {list(betas)}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.train.cuda_graphs and not cfg.train.compile:
        raise ConfigError("train.cuda_graphs: needs train.compile=true (the graphs are inductor's)")
    if cfg.train.cuda_graphs and cfg.train.ep_size > 1:
        raise ConfigError("train.cuda_graphs: needs train.ep_size=1 (expert parallelism's token exchanges have "
                          "sizes known only at run time, which a CUDA graph cannot replay)")
    if cfg.data.source == "wds" and not cfg.data.path:
        raise ConfigError("data.path: required when data.source=wds (directory with manifest.json)")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """YAML file (optional) + overrides -> validated Config. The model preset is applied first."""
    from promoe_ds.models.presets import preset_fields  # presets live with the models

    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    ov = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    tree = _merge(tree, ov)
    preset = (tree.get("model") or {}).get("preset", "") if isinstance(tree.get("model"), dict) else ""
    if preset:
        tree["model"] = _merge(preset_fields(preset), tree["model"])
    cfg = Config()
    _fill(cfg, tree, "")
    return validate(cfg)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def run_command(fn, *args) -> int:
    """A command's exit code: ``fn(*args)``'s (0 for None), or after one ``error: ...`` line on stderr 2 for a
    ConfigError (a user's mistake, never a traceback) and 1 for a RunError."""
    try:
        return fn(*args) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# The position-embedding layout of files (checkpoint meta.json, exported safetensors) written before the model config
# recorded it: promoe-ds trained with the row coordinate in the first half of the channels.
LEGACY_POS_EMBED = "rows_first"
_noted: set[str] = set()


def with_recorded_layout(d: dict) -> dict:
    """A model config read from a file, with the position-embedding layout its weights were trained with."""
    return {"pos_embed": LEGACY_POS_EMBED, **d}


def model_config_diff(theirs: dict, ours: ModelConfig, where: str, ignore: tuple[str, ...] = ("preset",)) -> str:
    """`` (model.k: X in <where>, Y here; ...)`` for the model settings (a ModelConfig as a dict, from a checkpoint
    or an exported file; a setting it does not record has the value it was written with) that differ from
    ``ours``, the ``ignore``d ones aside; "" when none does."""
    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    a = dict(flat(_merge(to_dict(ModelConfig()), with_recorded_layout(theirs))))
    b = dict(flat(to_dict(ours)))
    diff = [f"model.{k}: {a.get(k)!r} in {where}, {b.get(k)!r} here" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in ignore]
    return f" ({'; '.join(diff)})" if diff else ""


def model_config_from_dict(d: dict, source: str = "") -> ModelConfig:
    """The ModelConfig of a file's model settings (``source`` names the file). A file without a position-embedding
    record was trained with the rows-first layout and keeps it (with one console note per file), so no weights
    trained before the record existed change their outputs."""
    if "pos_embed" not in d and source and source not in _noted:
        from promoe_ds.parallel.launch import launcher_env

        _noted.add(source)
        if launcher_env()[0] == 0:  # one note per job, not per rank
            print(f"note: {source} does not record its position-embedding layout (written by an earlier promoe-ds): "
                  f"its model keeps the layout it was trained with, model.pos_embed={LEGACY_POS_EMBED}",
                  file=sys.stderr)
    mc = ModelConfig()
    _fill(mc, with_recorded_layout(d), "model.")
    return mc


def adopt_pos_embed(ours: ModelConfig, theirs: dict, source: str) -> str:
    """Resumed or fine-tuned weights keep the position-embedding layout they were trained with: sets ``ours``'s
    to that of ``source``'s model settings ``theirs`` and returns a line saying so when the config had another."""
    layout, configured = model_config_from_dict(theirs, source).pos_embed, ours.pos_embed
    ours.pos_embed = layout
    if layout == configured or "pos_embed" not in theirs:  # no record: the note has said it
        return ""
    return f"model.pos_embed={layout}: the layout of {source}'s weights (the config has {configured})"
