"""Test worker for test_export.py, started as 2 gloo ranks by ``spawn_local``:

    python tests/live_gather.py OUT_DIR

Builds the engine the way train.py does (this rank's ep_rank, ``apply_expert_parallel``,
``deepspeed.initialize`` with ``build_ds_config``: ep_size 2, ZeRO-2), takes 3 optimizer steps with
EMA, saves ``OUT_DIR/checkpoints/step_00000003`` with ``checkpoint.save``, then all-gathers the
routed experts over the expert-parallel group. Rank 0 writes ``OUT_DIR/live.pt``: the live full
state (weights and EMA, 1-process names) and the distributed model's eval output on a fixed batch
with null labels (each rank computes half of it through the all-to-all).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import promoe_ds
from promoe_ds import checkpoint as ckpt
from promoe_ds.config import load_config, to_dict
from promoe_ds.data import build_latent_source
from promoe_ds.diffusion import build_objective
from promoe_ds.ds_config import build_ds_config
from promoe_ds.ema import EMA
from promoe_ds.models.dit import build_model
from promoe_ds.models.moe import routed_expert_layer
from promoe_ds.parallel.launch import init_distributed
from promoe_ds.train import diffusion_losses, step_draws

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
OVERRIDES = ["train.global_batch=8", "train.ep_size=2", "train.zero_stage=2", "train.seed=5", "train.ema_decay=0.5",
             "train.lr=1e-3"]
STEPS = 3


def main(out: Path) -> None:
    cfg = load_config(TINY, OVERRIDES)
    info = init_distributed()
    import deepspeed
    from deepspeed.utils import groups

    from promoe_ds.parallel.ep import apply_expert_parallel, create_groups, group_name, shard_experts

    t, m, rank, world = cfg.train, cfg.model, info.rank, info.world_size
    ep_rank = create_groups(t.ep_size)
    model = build_model(m, seed=t.seed)
    shard_experts(model, t.ep_size, ep_rank)
    apply_expert_parallel(model, t.ep_size)
    ds_cfg = build_ds_config(t, world, on_gpu=False)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_cfg)
    ema = EMA(model, t.ema_decay)
    objective = build_objective(cfg.objective)
    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    shape = (m.in_channels, m.input_size, m.input_size)
    data = build_latent_source(cfg.data, latent_shape=shape, num_classes=m.num_classes, micro_batch=micro, rank=rank,
                               world_size=world, seed=t.seed)
    for step in range(STEPS):
        x0, y = data.next_batch()
        draws = step_draws(objective, cfg, step, shape, range(rank * micro, (rank + 1) * micro))
        y = torch.where(draws.pop("drop"), torch.full_like(y, m.num_classes), y)
        losses, aux = diffusion_losses(objective, engine, x0, y, draws)
        loss = losses["loss"] + aux["aux_loss"]
        engine.backward(loss)
        engine.step()
        ema.update()

    meta = {"step": STEPS, "world_size": world, "ep_size": t.ep_size,
            "zero_stage": ds_cfg["zero_optimization"].get("stage", 0),
            "config": to_dict(cfg), "objective": cfg.objective.name, "version": promoe_ds.__version__}
    ckpt.save(engine, model, ema, out / "checkpoints", STEPS, meta, {"data": data.state_dict()}, rank=rank,
              ep_rank=ep_rank, expert_writer=True, keep_last=1)

    ep_group = groups._get_expert_parallel_group(group_name(t.ep_size))
    live = {"model": {}, "ema": {}}
    ema_state = ema.state_dict()
    for name, p in model.named_parameters():
        for kind, tensor in (("model", p.detach()), ("ema", ema_state[name])):
            if routed_expert_layer(name):  # EP rank order = global expert order
                parts = [torch.empty_like(tensor) for _ in range(t.ep_size)]
                dist.all_gather(parts, tensor.contiguous(), group=ep_group)
                tensor = torch.cat(parts)
            live[kind][name] = tensor.clone()

    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *shape, generator=g)
    tt = torch.rand(8, generator=g) * 1000
    y = torch.tensor([0, 3, m.num_classes, 7, m.num_classes, 1, 2, m.num_classes])  # null -> unconditional expert
    half = slice(rank * 4, rank * 4 + 4)
    with torch.no_grad():
        o, _ = engine.module(x[half], tt[half], y[half])
    outs = [torch.empty_like(o) for _ in range(world)]
    dist.all_gather(outs, o.contiguous())
    if rank == 0:
        torch.save({"live": live, "x": x, "t": tt, "y": y, "out": torch.cat(outs)}, out / "live.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
