"""Training on the DeepSpeed engine: ZeRO-1/2, expert parallelism, EMA, exact resume.

One process per device (started by ``deepspeed``, ``torchrun`` or ``srun``). Per step, every
random draw (noise, timesteps, label dropout) of sample i of the global batch comes from a generator
seeded by (seed, step, micro-step, i) and each rank draws its own rows: a run's trajectory does not
depend on its world size or ep_size, and a resumed run continues exactly where it stopped.

Exit status: 0 when ``train.steps`` is reached, 99 when a SIGTERM / SIGUSR1 made it checkpoint
and stop, 98 when another rank stopped answering for ``train.collective_timeout`` seconds
(parallel/watchdog.py); the Slurm template requeues the job on 98 and 99.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import promoe_ds
from promoe_ds import checkpoint as ckpt
from promoe_ds.config import Config, ConfigError, adopt_pos_embed, to_dict
from promoe_ds.data import build_latent_source, stable_seed
from promoe_ds.diffusion import build_objective
from promoe_ds.ds_config import adamw_params, batch_layout, build_ds_config
from promoe_ds.ema import EMA
from promoe_ds.metrics import MetricsLogger, train_flops_per_image
from promoe_ds.models.dit import build_model, compile_model, count_params
from promoe_ds.optim import AdamWEMA, keep_bf16_weights
from promoe_ds.parallel import watchdog
from promoe_ds.parallel.launch import init_distributed
from promoe_ds.profiling import StepProfiler, phase

PREEMPTED_EXIT = 99


def preflight(cfg: Config, world_size: int, device: torch.device) -> None:
    """Layout and input mistakes, before any weight is built."""
    t, moe = cfg.train, cfg.model.moe
    if t.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs: needs CUDA GPUs (this run is on {device.type})")
    existing = next(p for p in (Path(t.out_dir).absolute(), *Path(t.out_dir).absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"train.out_dir: cannot create {t.out_dir!r} ({existing} is "
                          f"{'not writable' if existing.is_dir() else 'a file'})")
    if t.compile_cache == "":
        raise ConfigError("train.compile_cache: auto, none or a directory (got an empty value)")
    if cfg.data.source == "wds" and not (Path(cfg.data.path) / "manifest.json").is_file():
        raise ConfigError(f"data.path: no manifest.json in {cfg.data.path!r} (make shards with python -m data_prep.encode)")
    if world_size % t.ep_size:
        raise ConfigError(f"train.ep_size: {t.ep_size} does not divide the world size {world_size}")
    if moe.router == "none":
        if t.ep_size != 1:
            raise ConfigError(f"train.ep_size: {t.ep_size} > 1 but the model is dense (model.moe.router=none)")
    elif moe.spec().routed % t.ep_size:
        raise ConfigError(f"train.ep_size: {t.ep_size} does not divide the {moe.spec().routed} routed experts "
                          f"of {moe.experts}")
    batch_layout(t, world_size)


def step_draws(objective, cfg: Config, step: int, micro: int, latent_shape, rows: range) -> dict:
    """Rows ``rows`` of the global micro-batch's random draws (noise, timesteps, label drop). Row i comes
    from its own generator, seeded by (seed, step, micro-step, i): a sample's draws do not depend on the
    world size, and a rank draws only its own rows (host work per rank independent of the world size)."""
    parts = []
    for i in rows:
        g = torch.Generator().manual_seed(stable_seed(cfg.train.seed, "draws", step, micro, i))
        d = objective.draw(1, latent_shape, g)
        d["drop"] = torch.rand(1, generator=g) < cfg.objective.class_dropout
        parts.append(d)
    return {k: torch.cat([d[k] for d in parts]) for k in parts[0]}


def to_device(tensors, device: torch.device):
    """Host tensors (nested in tuples / dicts) to ``device`` without waiting for it. A plain ``.to()`` from
    pageable memory synchronises the stream: the host would wait for the last step's optimizer and EMA
    kernels before drawing the next batch. From pinned memory the copies queue behind them."""
    if isinstance(tensors, dict):
        return {k: to_device(v, device) for k, v in tensors.items()}
    if isinstance(tensors, tuple):
        return tuple(to_device(v, device) for v in tensors)
    if device.type != "cuda":
        return tensors.to(device)
    return tensors.pin_memory().to(device, non_blocking=True)


class LateRead:
    """A small device tensor copied to the host behind the work queued so far. ``get()`` waits for that
    work only, not for what was queued since: on a GPU the copy goes to pinned memory behind an event,
    so reading a flag after later steps were queued does not drain the GPU's queue."""

    def __init__(self, t: torch.Tensor):
        self.host, self.ready = t, None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def get(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host


def clip_in_adamw(optimizer, norm: torch.Tensor, max_norm: float, ok: torch.Tensor) -> torch.Tensor:
    """Clipping and the non-finite skip inside torch's fused AdamW, no pass of their own: through the inputs
    torch's GradScaler uses, the fused kernel divides every gradient by ``grad_scale`` = max(1, norm / max_norm)
    and skips the whole update, AdamW's step count included, where ``found_inf`` is set: a non-finite loss on
    any rank (``ok`` = 0) or a non-finite gradient norm. Returns the device flag "update applied" (1 / 0);
    nothing here waits for the GPU. The trainer's ZeRO-0 step and the benchmark's step (bench/train_step.py)."""
    finite = ok * torch.isfinite(norm)
    optimizer.grad_scale = torch.clamp(norm / max_norm, min=1.0) if max_norm > 0 else None
    optimizer.found_inf = 1.0 - finite
    return finite


def finish(logger: MetricsLogger) -> None:
    """The end of a run on every rank: the ranks leave together and take the process group down before the
    interpreter exits (left to exit-time destructors, a rank whose peers had already gone once aborted with
    "terminate called without an active exception" after a finished run)."""
    logger.close()
    watchdog.mark("finish")
    dist.barrier()
    dist.destroy_process_group()


class StopFlag:
    """SIGTERM / SIGUSR1 / Ctrl-C (SIGINT) -> checkpoint at the end of the next step, then exit 99. A second
    Ctrl-C interrupts at once (KeyboardInterrupt), without a checkpoint."""

    def __init__(self):
        self.set = False
        self.pending = None  # the last call's all-reduced flag
        self.pid = os.getpid()  # forked DataLoader workers inherit the handler: they stay quiet
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and os.getpid() == self.pid:
            if self.set:
                raise KeyboardInterrupt
            print("Ctrl-C: checkpointing after the next step, then stopping (again: stop at once)", file=sys.stderr,
                  flush=True)
        self.set = True

    def agreed(self, device) -> bool:
        """The same answer on every rank: whether any rank had got a signal by the previous call. The
        all-reduced flag is read one call (one step) late, so no step waits for the GPU to drain."""
        stop = self.pending is not None and bool(self.pending.get().item())
        flag = torch.full((1,), float(self.set), device=device)  # a fill, not a (synchronising) host copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.pending = LateRead(flag)
        return stop


def use_compile_cache(setting: str, out_dir: Path) -> str:
    """train.compile_cache -> the directory inductor keeps its compiled graphs and kernels in (it reads
    TORCHINDUCTOR_CACHE_DIR at every compilation). ``auto``: ``<out_dir>/compile_cache``, which a resumed or
    requeued run finds again on any node that sees ``out_dir``; ``none``: inductor's own choice (the environment's
    TORCHINDUCTOR_CACHE_DIR, else node-local /tmp); else that path."""
    if setting != "none":
        path = out_dir / "compile_cache" if setting == "auto" else Path(setting)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.absolute())
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def compile_report() -> str:
    """How this process's compilations went so far: graphs inductor found in its cache / compiled."""
    from torch._dynamo.utils import counters

    hit, miss = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    return f" (torch.compile: {hit} of {hit + miss} graphs from the cache)"


def train(cfg: Config) -> int:
    stop = StopFlag()  # first: a preemption signal during start-up must not kill the process
    info = init_distributed(cfg.train.collective_timeout)
    import deepspeed
    from deepspeed.moe.utils import configure_moe_param_groups
    from promoe_ds.parallel.ep import apply_expert_parallel, create_groups, global_grad_norm, replica_group

    t, rank, world, device = cfg.train, info.rank, info.world_size, info.device
    on_gpu = device.type == "cuda"
    preflight(cfg, world, device)
    ds_cfg = build_ds_config(t, world, on_gpu)
    micro, gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    bf16 = ds_cfg["torch_autocast"]["enabled"]
    zero_stage = int(ds_cfg["zero_optimization"].get("stage", 0))
    out_dir = Path(t.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    resume_dir = ckpt.find_resume(ckpt_dir, t.resume)
    adopted = ""
    if resume_dir is not None:
        meta = ckpt.read_meta(resume_dir, ckpt.resume_hint(resume_dir))
        ckpt.check_layout(meta, world, t.ep_size, zero_stage, resume_dir)
        adopted = adopt_pos_embed(cfg.model, meta["config"]["model"], f"checkpoint {str(resume_dir)!r}")
    elif t.init_from:
        from promoe_ds.export import read_metadata

        adopted = adopt_pos_embed(cfg.model, json.loads(read_metadata(t.init_from)["config"]),
                                  f"weights file {t.init_from!r}")
    if adopted and rank == 0:
        print(adopted, flush=True)
    m = cfg.model
    latent_shape = (m.in_channels, m.input_size, m.input_size)
    data = build_latent_source(cfg.data, latent_shape=latent_shape, num_classes=m.num_classes, micro_batch=micro,
                               rank=rank, world_size=world, seed=t.seed)
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.out_dir: cannot create {t.out_dir!r} ({e.strerror})") from None
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    watchdog.note_to(out_dir)
    counts = count_params(m)
    logger = MetricsLogger(out_dir, rank, device, t.global_batch, world,
                           train_flops_per_image(m, counts["activated_params"]), cfg.wandb, to_dict(cfg))

    is_moe = m.moe.router != "none"
    ep_rank = create_groups(t.ep_size) if is_moe else 0
    model = build_model(m, seed=t.seed, ep_size=t.ep_size, ep_rank=ep_rank)
    backend = model.set_expert_backend(m.moe.backend, device)
    model.grad_checkpoint = t.grad_checkpoint
    if t.init_from and resume_dir is None:
        from promoe_ds.export import load_into

        load_into(model, t.init_from)
        if rank == 0:
            print(f"weights initialised from {t.init_from}", flush=True)
    if is_moe:
        apply_expert_parallel(model, t.ep_size)
    model.to(device)
    params = list(model.parameters())
    ema = EMA(model, t.ema_decay, replicas=replica_group)  # sharded over the ranks holding the same weights
    if t.bf16_weights:  # after the EMA took the float32 values
        keep_bf16_weights(model)
    optimizer = None  # DeepSpeed's, from its config
    if t.fused_ema:  # AdamW updates the EMA in its own pass (ZeRO-0); the param groups DeepSpeed's optimizer
        # would get (MoE: dense and expert groups), so either optimizer resumes the other's checkpoints
        optimizer = AdamWEMA(configure_moe_param_groups(params) if is_moe else params, ema.averages(), t.ema_decay,
                             **adamw_params(t))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=ds_cfg)
    if zero_stage == 0 and world == 1:
        # one rank: DeepSpeed's reduction would only flatten the gradients, scale them by 1 and copy them back
        # (measured: 3.5% of the step); DeepSpeed itself turns it off only when there is no process group
        engine.enable_backward_allreduce = False
    objective = build_objective(cfg.objective)
    expert_writer = (rank // t.ep_size) == 0  # first expert-data-parallel replica of each EP rank

    start = 0
    if resume_dir is not None:
        rank_state = ckpt.load(engine, model, ema, resume_dir, meta, rank=rank, ep_rank=ep_rank)
        start = int(meta["step"])
        data.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["rng"]["torch"])
        if rank == 0:
            print(f"resumed from {resume_dir.name} at step {start}", flush=True)

    forward = engine
    if t.compile:
        cache = use_compile_cache(t.compile_cache, out_dir)
        forward = compile_model(engine.module, cuda_graphs=t.cuda_graphs)
        if rank == 0:
            print(f"torch.compile: the first steps compile (minutes for the XL presets, less from a warm cache); "
                  f"cache {cache}", flush=True)
    precision = ("bf16 autocast" + (", bf16 weights" if t.bf16_weights else "")) if bf16 else "fp32"
    if rank == 0:
        print(f"promoe-ds {promoe_ds.__version__}: {m.preset or 'custom'} "
              f"{counts['total_params'] / 1e6:.1f}M params ({counts['activated_params'] / 1e6:.1f}M activated), "
              f"world {world}, ep_size {t.ep_size}, ZeRO-{zero_stage}, "
              f"micro-batch {micro} x grad-accum {gas}, {precision}, "
              f"experts '{backend}', steps {start} -> {t.steps}", flush=True)
        if start >= t.steps:
            print(f"nothing to train: the checkpoint is at step {start}, train.steps={t.steps} "
                  "(raise train.steps to go on)", flush=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def save(step: int) -> None:
        watchdog.mark("checkpoint", step)
        meta = {"step": step, "world_size": world, "ep_size": t.ep_size,
                "zero_stage": zero_stage, "config": to_dict(cfg),
                "objective": cfg.objective.name, "version": promoe_ds.__version__}
        rank_state = {"data": data_state, "rng": {"torch": torch.get_rng_state()},
                      "param_digest": ckpt.param_digest(model)}
        tag_dir = ckpt.save(engine, model, ema, ckpt_dir, step, meta, rank_state, rank=rank, ep_rank=ep_rank,
                            expert_writer=expert_writer, keep_last=t.keep_last)
        if rank == 0:
            print(f"checkpoint {tag_dir}", flush=True)

    profiler = (StepProfiler(out_dir, rank, t.profile_at, t.profile_steps, device, t.profile_python)
                if t.profile_at else None)

    def micro_batch(s: int, mi: int):
        """Micro-batch ``mi`` of step ``s`` (0-based) on the device: read, random draws, CFG's null label; the
        copies are queued, nothing waits for the GPU."""
        with phase("data"):
            x0, y = data.next_batch()
            draws = step_draws(objective, cfg, s, mi, latent_shape, range(rank * micro, (rank + 1) * micro))
            y = torch.where(draws.pop("drop"), torch.full_like(y, m.num_classes), y)  # CFG's null label
            return to_device((x0, y, draws), device)

    bad_in_a_row, skipped = 0, 0
    step = start
    started = time.perf_counter()
    logger.start()
    data_state = data.state_dict()  # where a checkpoint of the last finished step resumes reading
    batch = micro_batch(step, 0) if step < t.steps else None
    while step < t.steps:
        watchdog.mark("data", step + 1)
        if profiler:
            profiler.begin(step + 1)
        ok = torch.ones((), device=device)  # 0 once a micro-batch of this step had a non-finite loss on any rank
        for mi in range(gas):
            x0, y, draws = batch
            with phase("forward"):
                aux = {}

                def model_fn(xt, tt):
                    out, a = forward(xt, tt, y)
                    aux.update(a)
                    return out

                with autocast:
                    losses = objective.training_losses(model_fn, x0, draws)
                loss = losses["loss"] + aux["aux_loss"]
                finite = torch.isfinite(loss.detach()).float()
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                ok = ok * finite
                # x 1, or x NaN from the first bad micro-batch on: every rank's gradients turn NaN (see below)
                loss = loss * torch.where(ok > 0, 1.0, float("nan"))
                bad_read = LateRead(ok)  # copied before the backward is queued: read after step(), it waits for nothing
            with phase("backward"):
                engine.backward(loss)
            # The next micro-batch's host work runs here, while the GPU works through this backward: after the
            # optimizer's host sync below the GPU has only AdamW and the EMA queued, and would sit idle while the
            # host read and drew the next batch (measured: docs/speed.md, "The host's share of the step").
            if mi + 1 < gas:
                nxt = (step, mi + 1)
            else:  # the step's last micro-batch: a checkpoint of this step resumes reading from here
                nxt, data_state = (step + 1, 0), data.state_dict()
            batch = micro_batch(*nxt) if nxt[0] < t.steps else None
            with phase("optimizer"):
                if zero_stage == 0 and mi == gas - 1:
                    # DeepSpeed's ZeRO-0 would clip per parameter in Python and apply non-finite gradients
                    norm = global_grad_norm(params, t.ep_size)
                    update_ok = clip_in_adamw(engine.optimizer, norm, t.grad_clip, ok)
                    # what the engine reads from its optimizer: it then counts a skip, holds the LR schedule and
                    # reports the norm as under ZeRO-1/2. The step's one host sync (without it: no faster, docs/speed.md)
                    engine.optimizer._global_grad_norm = norm
                    engine.optimizer.overflow = update_ok.item() == 0
                engine.step()
            # device tensors, summed on the GPU and read at the next log; micro-batches of a bad step left out
            logger.add({"rcl": aux["rcl"], "lb": aux["lb"], **losses}, aux.get("counts"), keep=ok)
        # Skipping a step with a non-finite loss is DeepSpeed's own fp16-overflow skip, with no host sync of
        # ours: the loss check is all-reduced, and from the first bad micro-batch on every rank multiplies its
        # loss by NaN, so every gradient that the loss reaches turns NaN on every rank, the all-to-alls of the
        # backward running as usual. At the accumulation boundary the ZeRO-1/2 optimizer's step() finds the
        # global gradient norm non-finite (checked for fp32 master weights too; the non-expert norm is summed
        # over all ranks), sets `overflow`, drops the gradients accumulated over ALL micro-batches of the step
        # and returns before AdamW runs: weights, moments and AdamW's step count stay bit for bit (ZeRO-0:
        # clip_in_adamw does the same). The engine counts the step in its skipped_steps, does not step the LR
        # scheduler and advances its micro/global step counters as usual, so the next step is a normal one.
        # DeepSpeed also skips steps whose losses were finite but whose gradients were not, so EMA and the
        # counters follow was_step_applied(). An optimizer without this check
        # (zero_optimization.compute_grad_norm=false) would have applied the NaNs: stop, never train on.
        applied = engine.was_step_applied()
        bad = bad_read.get().item() == 0
        step += 1
        if step == start + 1 and rank == 0:
            print(f"step {step}: {time.perf_counter() - started:.1f} s{compile_report() if t.compile else ''}",
                  flush=True)
        logger.step()
        if bad and applied:
            raise RuntimeError(f"step {step}: DeepSpeed applied an update with non-finite gradients (its optimizer "
                               "has no overflow skip: keep zero_optimization.compute_grad_norm=true); "
                               f"the weights are invalid, resume from the last checkpoint in {ckpt_dir}")
        if not applied:
            skipped += 1
            bad_in_a_row += 1
            if rank == 0:
                print(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row, "
                      f"{skipped} total)", flush=True)
            if bad_in_a_row >= t.max_bad_steps:
                raise RuntimeError(f"step {step}: {bad_in_a_row} step(s) in a row skipped for a non-finite loss or "
                                   f"gradient: aborting (train.max_bad_steps={t.max_bad_steps}); last good "
                                   f"checkpoint in {ckpt_dir}")
        else:
            bad_in_a_row = 0
            if not t.fused_ema:
                with phase("ema"):
                    ema.update()
        with phase("bookkeeping"):
            if step % t.log_every == 0 or step == t.steps:
                logger.log(step, {"grad_norm": float(engine.get_global_grad_norm() or 0.0),
                                  "lr": engine.get_lr()[0], "skipped_steps": skipped,
                                  **{f"data/{k}": v for k, v in data.stats.items()}})
            stopping = stop.agreed(device)
        if profiler:
            profiler.end(step, last=stopping or step == t.steps)
        if stopping or (t.ckpt_every and (step % t.ckpt_every == 0 or step == t.steps)):
            save(step)
        if stopping:
            if rank == 0:
                print(f"stopped by signal at step {step}: checkpoint written, exit {PREEMPTED_EXIT}", flush=True)
            finish(logger)
            return PREEMPTED_EXIT
    finish(logger)
    return 0


def main(config_path: str | None, overrides: list[str]) -> int:
    from promoe_ds.config import load_config

    cfg = load_config(config_path, overrides)
    try:
        return train(cfg)
    except RuntimeError as e:  # a collective failed because another rank went away: one line, exit 98
        watchdog.exit_if_peer_lost(e)
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
