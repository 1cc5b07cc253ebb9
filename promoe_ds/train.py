"""Training on the DeepSpeed engine: ZeRO-1/2, expert parallelism, EMA, exact resume on any layout.

One process per device (started by ``deepspeed``, ``torchrun`` or ``srun``). Per step, every
random draw (noise, timesteps, label dropout) of sample i of the global batch comes from a generator
seeded by (seed, step, i) and each rank draws its own rows: a run's trajectory does not depend on its
world size, ep_size, ZeRO stage or gradient accumulation (up to float reduction order; the RCL's
statistics are those of a global micro-batch), and a resumed run continues where it stopped: on the
layout that wrote the checkpoint bit for bit, on another one with the same weights, EMA, AdamW state,
LR schedule position and data position (checkpoint.py, reshard.py).

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
from promoe_ds import reshard, rundir
from promoe_ds.config import Config, ConfigError, RunError, adopt_pos_embed, model_config_diff, to_dict
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
        raise ConfigError(f"data.path: no manifest.json in {cfg.data.path!r} "
                          "(make shards with python -m data_prep.encode)")
    if world_size % t.ep_size:
        raise ConfigError(f"train.ep_size: {t.ep_size} does not divide the world size {world_size}")
    if moe.router == "none":
        if t.ep_size != 1:
            raise ConfigError(f"train.ep_size: {t.ep_size} > 1 but the model is dense (model.moe.router=none)")
    elif moe.spec().routed % t.ep_size:
        raise ConfigError(f"train.ep_size: {t.ep_size} does not divide the {moe.spec().routed} routed experts "
                          f"of {moe.experts}")
    batch_layout(t, world_size)


def step_draws(objective, cfg: Config, step: int, latent_shape, rows: range) -> dict:
    """Rows ``rows`` of the step's global batch's random draws (noise, timesteps, label drop). Row i comes
    from its own generator, seeded by (seed, step, 0, i): a sample's draws depend neither on the world size
    nor on the gradient accumulation, and a rank draws only its own rows (host work per rank independent of
    the world size). Micro-batch m of a step holds rows [m * world * micro, (m + 1) * world * micro)."""
    parts = []
    for i in rows:
        g = torch.Generator().manual_seed(stable_seed(cfg.train.seed, "draws", step, 0, i))
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


def finish(logger: MetricsLogger, run_lock: int | None) -> None:
    """The end of a run on every rank: the ranks leave together, rank 0 gives up the run directory, and they take
    the process group down before the interpreter exits (left to exit-time destructors, a rank whose peers have
    already gone can abort with "terminate called without an active exception" after a finished run)."""
    logger.close()
    watchdog.mark("finish")
    dist.barrier()
    rundir.release(run_lock)
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


def diffusion_losses(objective, forward, x0: torch.Tensor, y: torch.Tensor, draws: dict) -> tuple[dict, dict]:
    """(the objective's losses, the model's auxiliary outputs) of one micro-batch: ``forward(x_t, t, y)`` returns
    the prediction and the MoE layers' auxiliary losses (``aux_loss`` = RCL, Eq. 6, + load balancing, weighted),
    which the objective, calling the model on its own noised input, does not see. The trainer's step and the
    benchmark's (bench/train_step.py)."""
    aux = {}

    def model_fn(xt, t):
        out, a = forward(xt, t, y)
        aux.update(a)
        return out

    return objective.training_losses(model_fn, x0, draws), aux


class Trainer:
    """One process's part of a training run, torchtitan's shape: ``__init__`` builds everything (process group,
    data, model, EMA, DeepSpeed engine) and resumes from the newest checkpoint; ``train()`` runs the steps,
    ``train_step()`` is one optimizer step; ``state_dict()`` / ``load_state_dict()`` are what a checkpoint keeps
    of this rank besides the engine, the weights and the EMA.

    The step keeps the host ahead of the GPU: nothing in it waits for the device but the ZeRO-0 optimizer's
    "update applied" flag; loss flags are read one step late (``LateRead``, ``StopFlag``), and the next
    micro-batch is read and drawn while the GPU runs the backward."""

    def __init__(self, cfg: Config):
        self.stop = StopFlag()  # first: a preemption signal during start-up must not kill the process
        info = init_distributed(cfg.train.collective_timeout)
        self.cfg, t = cfg, cfg.train
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        preflight(cfg, self.world, self.device)
        self.ds_cfg = build_ds_config(t, self.world, self.device.type == "cuda")
        self.micro = self.ds_cfg["train_micro_batch_size_per_gpu"]
        self.gas = self.ds_cfg["gradient_accumulation_steps"]
        self.zero_stage = int(self.ds_cfg["zero_optimization"].get("stage", 0))
        self.layout = {"world_size": self.world, "ep_size": t.ep_size, "zero_stage": self.zero_stage,
                       "micro_batch": self.micro, "grad_accum": self.gas}
        self.out_dir = Path(t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        m = cfg.model
        self.latent_shape = (m.in_channels, m.input_size, m.input_size)
        self.data = build_latent_source(cfg.data, latent_shape=self.latent_shape, num_classes=m.num_classes,
                                        micro_batch=self.micro, grad_accum=self.gas, rank=self.rank,
                                        world_size=self.world, seed=t.seed)
        self.run_lock = rundir.agree(self.rank, rundir.lock, self.out_dir)  # creates out_dir; held until the end
        resume_dir, meta = self._resume_point()
        rundir.agree(self.rank, rundir.one_run, self.out_dir, resume_dir, int(meta["step"]) if meta else 0,
                     t.overwrite)
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        watchdog.note_to(self.out_dir)
        self.counts = count_params(m)
        self.logger = MetricsLogger(self.out_dir, self.rank, self.device, t.global_batch, self.world,
                                    train_flops_per_image(m, self.counts["activated_params"]), cfg.wandb, to_dict(cfg))
        self._build_model(from_scratch=resume_dir is None)
        self.objective = build_objective(cfg.objective)
        self.step = 0
        if resume_dir is not None:
            self.load_checkpoint(resume_dir, meta)
        self.forward = self.engine
        if t.compile:
            cache = use_compile_cache(t.compile_cache, self.out_dir)
            self.forward = compile_model(self.engine.module, cuda_graphs=t.cuda_graphs)
            if self.rank == 0:
                print(f"torch.compile: the first steps compile (minutes for the XL presets, less from a warm "
                      f"cache); cache {cache}", flush=True)
        self._announce()
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=self.ds_cfg["torch_autocast"]["enabled"])
        self.profiler = (StepProfiler(self.out_dir, self.rank, t.profile_at, t.profile_steps, self.device,
                                      t.profile_python) if t.profile_at else None)
        self.bad_in_a_row = self.skipped = 0
        self.data_state = None  # where a checkpoint of the last finished step resumes reading (train())
        self.batch = None  # the next micro-batch, on the device

    def _resume_point(self) -> tuple[Path | None, dict | None]:
        """(the checkpoint tag this run resumes from, its meta.json), or (None, None) for a new run. The model
        takes the position-embedding layout of the weights it starts from (the checkpoint's, or
        ``train.init_from``'s)."""
        t = self.cfg.train
        resume_dir, meta, adopted = ckpt.find_resume(self.ckpt_dir, t.resume), None, ""
        if resume_dir is not None:
            meta = ckpt.read_meta(resume_dir, ckpt.resume_hint(resume_dir))
            self.same_layout = ckpt.check_layout(meta, self.world, t.ep_size, self.zero_stage, t.global_batch,
                                                 resume_dir)
            adopted = adopt_pos_embed(self.cfg.model, meta["config"]["model"], f"checkpoint {str(resume_dir)!r}")
        elif t.init_from:
            from promoe_ds.export import read_metadata

            theirs = json.loads(read_metadata(t.init_from)["config"])
            adopted = adopt_pos_embed(self.cfg.model, theirs, f"weights file {t.init_from!r}")
            # settings of the same shapes (routing, ...) may differ on purpose: said, not refused
            if other := model_config_diff(theirs, self.cfg.model, "the file", ignore=("preset", "moe.backend")):
                adopted = "\n".join(filter(None, [adopted, f"note: train.init_from: other model settings{other}"]))
        if adopted and self.rank == 0:
            print(adopted, flush=True)
        return resume_dir, meta

    def _build_model(self, from_scratch: bool) -> None:
        """The model (this rank's slice of the routed experts), its EMA, the optimizer and the DeepSpeed engine."""
        import deepspeed
        from deepspeed.moe.utils import configure_moe_param_groups

        from promoe_ds.parallel.ep import apply_expert_parallel, create_groups, replica_group, shard_experts

        t, m = self.cfg.train, self.cfg.model
        self.is_moe = m.moe.router != "none"
        self.ep_rank = create_groups(t.ep_size) if self.is_moe else 0
        self.expert_writer = (self.rank // t.ep_size) == 0  # first expert-data-parallel replica of each EP rank
        with torch.device("meta"):  # the weights are made once this rank has taken its slice of the experts
            self.model = build_model(m, seed=t.seed)
        if self.is_moe:
            shard_experts(self.model, t.ep_size, self.ep_rank)
        self.model.to_empty(device="cpu").init_weights()
        self.backend = self.model.set_expert_backend(m.moe.backend, self.device)
        self.model.grad_checkpoint = t.grad_checkpoint
        if t.init_from and from_scratch:
            from promoe_ds.export import load_into

            load_into(self.model, t.init_from)
            if self.rank == 0:
                print(f"weights initialised from {t.init_from}", flush=True)
        if self.is_moe:
            apply_expert_parallel(self.model, t.ep_size)
        self.model.to(self.device)
        self.params = list(self.model.parameters())
        self.ema = EMA(self.model, t.ema_decay, replicas=replica_group)  # sharded over the ranks holding a copy
        if t.bf16_weights:  # after the EMA took the float32 values
            keep_bf16_weights(self.model)
        optimizer = None  # DeepSpeed's, from its config
        if t.fused_ema:  # AdamW updates the EMA in its own pass (ZeRO-0); the param groups DeepSpeed's optimizer
            # would get (MoE: dense and expert groups), so either optimizer resumes the other's checkpoints
            groups = configure_moe_param_groups(self.params) if self.is_moe else self.params
            optimizer = AdamWEMA(groups, self.ema.averages(), t.ema_decay, **adamw_params(t))
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.params,
                                                    optimizer=optimizer, config=self.ds_cfg)
        if self.zero_stage == 0 and self.world == 1:
            # one rank: DeepSpeed's reduction would only flatten the gradients, scale them by 1 and copy them
            # back (3.5% of a ProMoE-XL step on an H100); DeepSpeed turns it off only without a process group
            self.engine.enable_backward_allreduce = False

    def _announce(self) -> None:
        """Rank 0's start-up line: model, layout, batch, precision, steps."""
        t, m, c = self.cfg.train, self.cfg.model, self.counts
        if self.rank != 0:
            return
        precision = "fp32"
        if self.ds_cfg["torch_autocast"]["enabled"]:
            precision = "bf16 autocast" + (", bf16 weights" if t.bf16_weights else "")
        print(f"promoe-ds {promoe_ds.__version__}: {m.preset or 'custom'} "
              f"{c['total_params'] / 1e6:.1f}M params ({c['activated_params'] / 1e6:.1f}M activated), "
              f"world {self.world}, ep_size {t.ep_size}, ZeRO-{self.zero_stage}, "
              f"micro-batch {self.micro} x grad-accum {self.gas}, {precision}, "
              f"experts '{self.backend}', steps {self.step} -> {t.steps}", flush=True)
        if self.step >= t.steps:
            print(f"nothing to train: the checkpoint is at step {self.step}, train.steps={t.steps} "
                  "(raise train.steps to go on)", flush=True)

    # ---- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's state that a checkpoint keeps besides engine, weights and EMA: where its data stream
        resumes reading (after the last finished step), the RNG state, and a digest of its parameters."""
        return {"data": self.data_state, "rng": {"torch": torch.get_rng_state()},
                "param_digest": ckpt.param_digest(self.model)}

    def load_state_dict(self, state: dict) -> str:
        """Returns what the data source did on another layout ("" when nothing worth a line)."""
        torch.set_rng_state(state["rng"]["torch"])
        return self.data.load_state_dict(state["data"])

    def save_checkpoint(self) -> None:
        watchdog.mark("checkpoint", self.step)
        t, started = self.cfg.train, time.perf_counter()
        meta = {"step": self.step, **self.layout, "engine": reshard.engine_counters(self.engine),
                "config": to_dict(self.cfg), "objective": self.cfg.objective.name, "version": promoe_ds.__version__}
        tag_dir = ckpt.save(self.engine, self.model, self.ema, self.ckpt_dir, self.step, meta, self.state_dict(),
                            rank=self.rank, ep_rank=self.ep_rank, expert_writer=self.expert_writer,
                            keep_last=t.keep_last)
        if self.rank == 0:
            print(f"checkpoint {tag_dir} ({time.perf_counter() - started:.1f} s)", flush=True)

    def load_checkpoint(self, tag_dir: Path, meta: dict) -> None:
        """Engine, weights, EMA and this rank's state from ``tag_dir`` (its ``meta.json`` read: ``meta``), on the
        layout that wrote it or on another one (checkpoint.py)."""
        all_data = not self.same_layout or meta.get("micro_batch", self.micro) != self.micro
        data_report = self.load_state_dict(ckpt.load(self.engine, self.model, self.ema, tag_dir, meta, rank=self.rank,
                                                     same_layout=self.same_layout, all_data=all_data))
        self.step = int(meta["step"])
        if self.rank == 0:
            print(f"resumed from {tag_dir.name} at step {self.step}{ckpt.layout_change(meta, self.layout)}", flush=True)
            if data_report:
                print(data_report, flush=True)

    # ---- the step ----------------------------------------------------------------------------------------

    def micro_batch(self, step: int, mi: int):
        """Micro-batch ``mi`` of step ``step`` (0-based) on the device: read, random draws, CFG's null label;
        the copies are queued, nothing waits for the GPU."""
        with phase("data"):
            x0, y = self.data.next_batch()
            first = (mi * self.world + self.rank) * self.micro  # this rank's rows of micro-batch mi in the step's batch
            draws = step_draws(self.objective, self.cfg, step, self.latent_shape, range(first, first + self.micro))
            y = torch.where(draws.pop("drop"), torch.full_like(y, self.cfg.model.num_classes), y)  # CFG's null label
            return to_device((x0, y, draws), self.device)

    def prefetch(self, mi: int) -> None:
        """The micro-batch after micro-batch ``mi`` of this step, into ``self.batch``. Called while the GPU works
        through ``mi``'s backward: after the optimizer's host sync the GPU has only AdamW and the EMA queued,
        and would sit idle while the host read and drew the next batch."""
        if mi + 1 < self.gas:
            step, mi = self.step, mi + 1
        else:  # the step's last micro-batch: a checkpoint of this step resumes reading from here
            step, mi, self.data_state = self.step + 1, 0, self.data.state_dict()
        self.batch = self.micro_batch(step, mi) if step < self.cfg.train.steps else None

    def train_step(self) -> tuple[bool, bool]:
        """One optimizer step over ``gas`` micro-batches of ``self.batch`` onwards; (update applied, non-finite
        loss). A non-finite loss on any rank turns every rank's loss, from that micro-batch on, into NaN, so
        that DeepSpeed's own overflow skip drops the whole step on every rank (see ``after_step``)."""
        ok = torch.ones((), device=self.device)  # 0 once a micro-batch of this step had a non-finite loss
        for mi in range(self.gas):
            x0, y, draws = self.batch
            with phase("forward"):
                with self.autocast:
                    losses, aux = diffusion_losses(self.objective, self.forward, x0, y, draws)
                loss = losses["loss"] + aux["aux_loss"]
                finite = torch.isfinite(loss.detach()).float()
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                ok = ok * finite
                loss = loss * torch.where(ok > 0, 1.0, float("nan"))  # x 1, or x NaN from the first bad micro-batch
                bad_read = LateRead(ok)  # copied before the backward is queued: read after step(), it waits for nothing
            with phase("backward"):
                self.engine.backward(loss)
            self.prefetch(mi)
            with phase("optimizer"):
                if self.zero_stage == 0 and mi == self.gas - 1:
                    self.clip_and_check(ok)
                self.engine.step()
            # device tensors, summed on the GPU and read at the next log; micro-batches of a bad step left out
            self.logger.add({"rcl": aux["rcl"], "lb": aux["lb"], **losses}, aux.get("counts"), keep=ok)
        return self.engine.was_step_applied(), bad_read.get().item() == 0

    def clip_and_check(self, ok: torch.Tensor) -> None:
        """ZeRO-0's clipping and non-finite skip, inside the fused AdamW (DeepSpeed's ZeRO-0 would clip per
        parameter in Python and apply non-finite gradients). The engine reads its optimizer's ``overflow`` and
        ``_global_grad_norm``: it then counts a skip, holds the LR schedule and reports the norm as under
        ZeRO-1/2. Reading the flag is the step's one host sync (deferring it made the step no faster)."""
        from promoe_ds.parallel.ep import global_grad_norm  # imports DeepSpeed: after init_distributed

        norm = global_grad_norm(self.params, self.cfg.train.ep_size)
        update_ok = clip_in_adamw(self.engine.optimizer, norm, self.cfg.train.grad_clip, ok)
        self.engine.optimizer._global_grad_norm = norm
        self.engine.optimizer.overflow = update_ok.item() == 0

    def after_step(self, applied: bool, bad: bool) -> None:
        """Counts a skipped update, or updates the EMA.

        A step with a non-finite loss is skipped by DeepSpeed's own fp16-overflow skip, with no host sync of
        ours: every rank's gradients are NaN (``train_step``), the all-to-alls of the backward running as usual.
        At the accumulation boundary the ZeRO-1/2 optimizer finds the global gradient norm non-finite (for fp32
        master weights too; the non-expert norm summed over all ranks), drops the gradients of ALL micro-batches
        of the step and returns before AdamW runs: weights, moments and AdamW's step count stay bit for bit
        (ZeRO-0: ``clip_in_adamw`` does the same). The engine counts the skip, holds the LR schedule and
        advances its step counters, so the next step is a normal one. Steps whose losses were finite but whose
        gradients were not are skipped too, so the EMA and the counters follow ``was_step_applied()``. An
        optimizer without this check (zero_optimization.compute_grad_norm=false) would have applied the NaNs:
        then the run stops rather than train on."""
        t = self.cfg.train
        if bad and applied:
            raise RuntimeError(f"step {self.step}: DeepSpeed applied an update with non-finite gradients (its "
                               "optimizer has no overflow skip: keep zero_optimization.compute_grad_norm=true); "
                               f"the weights are invalid, resume from the last checkpoint in {self.ckpt_dir}")
        if applied:
            self.bad_in_a_row = 0
            if not t.fused_ema:
                with phase("ema"):
                    self.ema.update()
            return
        self.skipped += 1
        self.bad_in_a_row += 1
        if self.rank == 0:
            print(f"step {self.step}: non-finite loss or gradient, update skipped ({self.bad_in_a_row} in a row, "
                  f"{self.skipped} total)", flush=True)
        if self.bad_in_a_row >= t.max_bad_steps:
            raise RuntimeError(f"step {self.step}: {self.bad_in_a_row} step(s) in a row skipped for a non-finite "
                               f"loss or gradient: aborting (train.max_bad_steps={t.max_bad_steps}); last good "
                               f"checkpoint in {self.ckpt_dir}")

    # ---- the run -----------------------------------------------------------------------------------------

    def train(self) -> int:
        """Steps up to ``train.steps``: 0, or ``PREEMPTED_EXIT`` after a stop signal's checkpoint."""
        t = self.cfg.train
        start, started = self.step, time.perf_counter()
        self.logger.start()
        self.data_state = self.data.state_dict()
        self.batch = self.micro_batch(self.step, 0) if self.step < t.steps else None
        while self.step < t.steps:
            watchdog.mark("data", self.step + 1)
            if self.profiler:
                self.profiler.begin(self.step + 1)
            applied, bad = self.train_step()
            self.step += 1
            if self.step == start + 1 and self.rank == 0:
                print(f"step {self.step}: {time.perf_counter() - started:.1f} s"
                      f"{compile_report() if t.compile else ''}", flush=True)
            self.logger.step(applied)
            self.after_step(applied, bad)
            with phase("bookkeeping"):
                if self.step % t.log_every == 0 or self.step == t.steps:
                    stats = self.data.stats
                    self.logger.log(self.step, {"grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                                                "lr": self.engine.get_lr()[0], "skipped_steps": self.skipped,
                                                **{f"data/{k}": v for k, v in stats.items() if k == "epoch"}},
                                    summed={f"data/{k}": v for k, v in stats.items() if k != "epoch"})  # counts
                stopping = self.stop.agreed(self.device)
            if self.profiler:
                self.profiler.end(self.step, last=stopping or self.step == t.steps)
            if stopping or (t.ckpt_every and (self.step % t.ckpt_every == 0 or self.step == t.steps)):
                self.save_checkpoint()
            if stopping:
                if self.rank == 0:
                    print(f"stopped by signal at step {self.step}: checkpoint written, exit {PREEMPTED_EXIT}",
                          flush=True)
                finish(self.logger, self.run_lock)
                return PREEMPTED_EXIT
        finish(self.logger, self.run_lock)
        return 0


def main(config_path: str | None, overrides: list[str]) -> int:
    from promoe_ds.config import load_config

    cfg = load_config(config_path, overrides)
    try:
        return Trainer(cfg).train()
    except RuntimeError as e:  # a collective failed because another rank went away: one line, exit 98
        watchdog.exit_if_peer_lost(e)
        raise
    except (ConfigError, RunError):  # raised on every rank alike: they leave together, as finish() does
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
