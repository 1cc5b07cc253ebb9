"""The DeepSpeed config a run uses: a base JSON from ``ds_configs/`` (ZeRO stage, buckets, offload)
plus the keys promoe-ds owns and fills from ``train.*`` (batch sizes, optimizer, clipping,
precision). Everything is checked here, before any process group or model exists, so a mistake
is one line naming the key instead of a traceback from inside DeepSpeed.
"""
from __future__ import annotations

import json
from pathlib import Path

from promoe_ds.config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# keys promoe-ds sets from train.* (a base JSON must not set them: one source of truth)
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
         "scheduler", "gradient_clipping", "bf16", "fp16", "torch_autocast")
# other top-level DeepSpeed keys a base JSON may set
ALLOWED = ("zero_optimization", "steps_per_print", "wall_clock_breakdown", "communication_data_type",
           "prescale_gradients", "gradient_predivide_factor", "zero_allow_untested_optimizer", "data_types",
           "flops_profiler", "comms_logger", "memory_breakdown", "checkpoint", "dump_state", "timers",
           "activation_checkpointing", "seq_parallel_communication_data_type", "zero_force_ds_cpu_optimizer")


def batch_layout(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for the global batch, or ConfigError."""
    g = train.global_batch
    micro = train.micro_batch or g // world_size
    if micro < 1 or g % (micro * world_size):
        raise ConfigError(f"train.global_batch: {g} does not divide into micro-batch {micro} x {world_size} ranks "
                          f"(x gradient accumulation); choose a multiple of {world_size * max(micro, 1)}")
    return micro, g // (micro * world_size)


def adamw_params(train: TrainConfig) -> dict:
    """AdamW's hyperparameters, for DeepSpeed's optimizer or the trainer's own (train.fused_ema)."""
    return {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8, "weight_decay": train.weight_decay}


def base_config(train: TrainConfig) -> tuple[dict, str]:
    if train.ds_config:
        path = Path(train.ds_config)
    else:
        if train.offload_optimizer and train.zero_stage != 2:
            raise ConfigError(f"train.offload_optimizer: needs train.zero_stage=2 (ds_configs/zero2_offload.json), "
                              f"not {train.zero_stage}")
        path = DS_CONFIG_DIR / (f"zero{train.zero_stage}" + ("_offload" if train.offload_optimizer else "") + ".json")
    if not path.is_file():
        raise ConfigError(f"train.ds_config: file {str(path)!r} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config: {str(path)!r} is not valid JSON ({e})") from None
    for key in cfg:
        if key in OWNED:
            raise ConfigError(f"ds_config key {key!r} in {str(path)!r} is set by promoe-ds from train.* keys; "
                              "remove it")
        if key not in ALLOWED:
            raise ConfigError(f"unknown ds_config key {key!r} in {str(path)!r} (allowed: {', '.join(ALLOWED)})")
    return cfg, str(path)


def build_ds_config(train: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    cfg, path = base_config(train)
    zero = cfg.setdefault("zero_optimization", {})
    try:
        zcfg = DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"ds_config zero_optimization.{'.'.join(map(str, err['loc']))} in {path!r}: "
                          f"{err['msg']}") from None
    if int(zcfg.stage) not in (0, 1, 2):
        raise ConfigError(f"ds_config zero_optimization.stage: {int(zcfg.stage)} is not supported "
                          "(ZeRO-3 partitions expert weights DeepSpeed's native MoE cannot handle); use 0, 1 or 2")
    if train.ep_size > 1 and not zcfg.contiguous_gradients:
        # DeepSpeed 0.19's non-contiguous path (buffered_reduce_fallback) all-reduces every gradient over the
        # whole data-parallel group, expert ones too: experts of different EP ranks would be averaged together
        # (MoE needs contiguous gradients: deepspeedai/DeepSpeed#2250)
        raise ConfigError(f"ds_config zero_optimization.contiguous_gradients in {path!r}: false is wrong with "
                          f"train.ep_size={train.ep_size} (DeepSpeed then reduces expert gradients over all ranks, "
                          "mixing different experts); remove it or set it true")
    micro, gas = batch_layout(train, world_size)
    bf16 = train.precision == "bf16" or (train.precision == "auto" and on_gpu)
    offload = zcfg.offload_optimizer is not None and str(zcfg.offload_optimizer.device) not in ("none",
                                                                                                 "OffloadDeviceEnum.none")
    zero0 = int(zcfg.stage) == 0
    if zero0 and offload:
        raise ConfigError(f"ds_config zero_optimization.offload_optimizer in {path!r}: needs ZeRO-1/2, not stage 0")
    cfg.update({
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        # ZeRO-0: the trainer clips inside the fused AdamW (train.clip_in_adamw); DeepSpeed's own ZeRO-0
        # clipping is per-parameter Python and its optimizer has no non-finite skip
        "gradient_clipping": 0.0 if zero0 else train.grad_clip,
        # bf16 autocast (fp32 master weights and gradients, as in the paper's recipe); DeepSpeed's own
        # "bf16" mode would cast the weights to bf16, and it switches off an outer autocast unless this is set
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "bf16": {"enabled": False},
    })
    if train.fused_ema and not zero0:
        raise ConfigError(f"train.fused_ema: needs ZeRO-0 (train.zero_stage=0; {path!r} has stage "
                          f"{int(zcfg.stage)}): ZeRO-1/2 step DeepSpeed's optimizer over their own partitions")
    if train.bf16_weights and not train.fused_ema:
        raise ConfigError("train.bf16_weights: needs train.fused_ema=true (its optimizer keeps the float32 masters)")
    if train.bf16_weights and not bf16:
        raise ConfigError(f"train.bf16_weights: needs bf16 autocast (train.precision=bf16, or auto on a GPU; this "
                          f"run is {train.precision!r}{'' if on_gpu else ' on the CPU'})")
    if train.bf16_weights and gas > 1:
        raise ConfigError(f"train.bf16_weights: gradients would add up in bf16 over {gas} micro-batches; use one "
                          "micro-batch per step (train.micro_batch=0 or global_batch / world size) or turn it off")
    if not train.fused_ema:  # with it the trainer hands DeepSpeed its own optimizer (optim.AdamWEMA)
        cfg["optimizer"] = {"type": "AdamW", "params": {
            **adamw_params(train),
            # torch's AdamW over the ZeRO partition; fused (one kernel, not a foreach pass per operation) on
            # GPUs, and with ZeRO-0 everywhere (its grad_scale / found_inf inputs clip and skip, see train.py)
            **({} if offload else {"torch_adam": True, "fused": on_gpu or zero0})}}
    # DeepSpeed's throughput timer (on unless the base JSON sets "timers") synchronises the device at every
    # engine forward and step() to time them, draining the GPU's queue twice per micro-step; its only output
    # is a log line every steps_per_print steps, and the metrics logger reports img/s without a sync
    cfg.setdefault("timers", {"throughput": {"enabled": False}})
    if train.warmup_steps:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                                                           "warmup_num_steps": train.warmup_steps,
                                                           "warmup_type": "linear"}}
    return cfg
