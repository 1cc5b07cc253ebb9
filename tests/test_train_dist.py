"""Distributed training on the real DeepSpeed engine, several gloo processes on the CPU."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from promoe_ds.config import ConfigError, MoEConfig, load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.ds_config import build_ds_config
from promoe_ds.models.dit import build_model
from promoe_ds.models.moe import routed_expert_layer
from promoe_ds.train import step_draws

from dist_utils import REPO, TINY, free_port, launch, metrics, run

pytestmark = pytest.mark.slow

COMMON = ["train.global_batch=8", "train.log_every=1", "train.seed=3", "objective.class_dropout=0.25"]


def load_full(tag_dir):
    """Every parameter of the model and its EMA (``name:ema``) from a checkpoint: dense file + the experts of
    every EP rank."""
    own = tag_dir / "promoe"
    state = {}
    for n, e in torch.load(own / "dense.pt").items():
        state[n], state[f"{n}:ema"] = e["model"], e["ema"]
    shards = sorted(own.glob("experts_ep*.pt"))
    parts = {}
    for f in shards:
        for n, e in torch.load(f)["params"].items():
            parts.setdefault(n, []).append(e["model"])
            parts.setdefault(f"{n}:ema", []).append(e["ema"])
    state.update({n: torch.cat(v) for n, v in parts.items()})
    return state, len(shards)


def test_step_draws_do_not_depend_on_the_world_size():
    """Each rank draws only its rows; the rows are the same whoever draws them, in whichever micro-batch."""
    cfg = load_config(TINY, COMMON)
    objective, shape = build_objective(cfg.objective), (4, 8, 8)
    whole = step_draws(objective, cfg, 5, shape, range(16))
    parts = [step_draws(objective, cfg, 5, shape, range(2 * r, 2 * r + 2)) for r in range(8)]  # 2 x 4 ranks
    assert whole["noise"].shape == (16, *shape) and whole["t"].shape == (16,) and whole["drop"].dtype == torch.bool
    for k in whole:
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts])), k
    for other in (step_draws(objective, cfg, 6, shape, range(8)), step_draws(objective, cfg, 5, shape, range(8, 16))):
        assert not torch.equal(other["noise"], whole["noise"][:8]) and not torch.equal(other["t"], whole["t"][:8])
    many = step_draws(objective, cfg, 0, shape, range(4000))  # independent rows with the configured laws
    assert abs(many["drop"].float().mean() - 0.25) < 0.03
    assert abs(many["noise"].mean()) < 0.01 and abs(many["noise"].std() - 1) < 0.01
    assert many["t"].unique().numel() == 4000 and many["t"].min() > 0 and many["t"].max() < 1


def test_ep2_zero0_zero1_zero2_match_single_process(tmp_path):
    steps = ["train.steps=3", "train.ckpt_every=3"]
    run(1, COMMON + ["train.steps=5", "train.ckpt_every=3", "train.ep_size=1", "train.zero_stage=0",
                     f"train.out_dir={tmp_path / 'one'}"], tmp_path / "log1")  # ZeRO-0, one rank: no reduction
    run(2, COMMON + steps + ["train.ep_size=2", f"train.out_dir={tmp_path / 'two'}", "wandb.mode=offline"],
        tmp_path / "log2")
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["rcl"] == pytest.approx(a["rcl"], rel=1e-4, abs=1e-6)
    assert m1[-1]["loss"] != m1[0]["loss"]  # it trained
    assert min(r["grad_norm"] for r in m1) > 2 * 0.5  # clipped at 0.5 on every step: the norm decides the update
    tag1, tag2 = tmp_path / "one/checkpoints/step_00000003", tmp_path / "two/checkpoints/step_00000003"
    s1, n1 = load_full(tag1)
    s2, n2 = load_full(tag2)
    assert (n1, n2) == (1, 2) and s1.keys() == s2.keys()
    init = dict(build_model(load_config(TINY, COMMON).model, seed=3).named_parameters())
    for name in s1:
        torch.testing.assert_close(s2[name], s1[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(s1["blocks.1.mlp.routed_experts.w1"], init["blocks.1.mlp.routed_experts.w1"])
    # ZeRO-1 (ds_configs/zero1.json: gradients reduced once, after the backward)
    run(2, COMMON + steps + ["train.ep_size=2", "train.zero_stage=1", f"train.out_dir={tmp_path / 'z1'}"],
        tmp_path / "log3")
    s3, n3 = load_full(tmp_path / "z1/checkpoints/step_00000003")
    assert n3 == 2 and s3.keys() == s1.keys()
    for name in s1:
        torch.testing.assert_close(s3[name], s1[name], rtol=1e-4, atol=1e-6, msg=name)
    # ZeRO-0 (clipping by the global norm inside the fused AdamW, expert norms summed over the EP group), then
    # resumed from its step-3 checkpoint (AdamW moments from DeepSpeed's per-EP-rank optimizer files) to step 5
    # with train.fused_ema (optim.AdamWEMA: AdamW and the sharded EMA in one compiled pass, from torch's AdamW state)
    z0 = COMMON + ["train.ep_size=2", "train.zero_stage=0", f"train.out_dir={tmp_path / 'z0'}"]
    run(2, z0 + steps, tmp_path / "log4")
    s4, n4 = load_full(tmp_path / "z0/checkpoints/step_00000003")
    assert n4 == 2 and s4.keys() == s1.keys()
    for name in s1:
        torch.testing.assert_close(s4[name], s1[name], rtol=1e-4, atol=1e-6, msg=name)
    run(2, z0 + ["train.steps=5", "train.ckpt_every=3", "train.fused_ema=true"], tmp_path / "log5")
    assert [r["step"] for r in metrics(tmp_path / "z0")] == [1, 2, 3, 4, 5]
    for a, b in zip(m1, metrics(tmp_path / "z0")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    s5, _ = load_full(tmp_path / "z0/checkpoints/step_00000005")
    s6, _ = load_full(tmp_path / "one/checkpoints/step_00000005")
    for name in s6:
        torch.testing.assert_close(s5[name], s6[name], rtol=1e-4, atol=1e-6, msg=name)
    # replicated weights identical on both ranks, routed experts different (each rank its own slice)
    d0 = torch.load(tag2 / "promoe/rank00000.pt", weights_only=False)["param_digest"]
    d1 = torch.load(tag2 / "promoe/rank00001.pt", weights_only=False)["param_digest"]
    for name in d0:
        if routed_expert_layer(name):
            assert d0[name] != d1[name], name
        else:
            assert d0[name] == d1[name], name
    assert list((tmp_path / "two").glob("wandb/offline-run-*")), "wandb offline run not written"
    # a checkpoint without the layout-independent optimizer state (meta.json without the engine counters that come
    # with it) resumes only on its own layout: one clear line (other layouts: tests/test_resume_anywhere.py)
    meta = tag2 / "meta.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "engine"}))
    r = subprocess.run([sys.executable, "-m", "promoe_ds.cli", "train", "--config", str(TINY), *COMMON,
                        "train.steps=5", "train.ep_size=1", f"train.out_dir={tmp_path / 'two'}"], cwd=REPO,
                       env=dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port())),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "world_size=2, ep_size=2" in r.stderr and "init_from" in r.stderr, r.stderr[-2000:]


def _dispatch_worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from promoe_ds.models.moe import MoEMLP
    from promoe_ds.parallel.ep import AllReduceStats, AllToAllDispatcher

    cfg = MoEConfig(router="promoe", experts="E6A2S1U1", expert_mlp_ratio=2.0)
    full = MoEMLP(16, cfg, mlp_ratio=4.0, layer_seed=1).double().train()
    part = MoEMLP(16, cfg, mlp_ratio=4.0, layer_seed=1).double().train()
    part.routed_experts = part.routed_experts.shard(rank, 2)  # global experts 2 * rank, 2 * rank + 1
    assert torch.equal(part.routed_experts.w1, full.routed_experts.w1[2 * rank:2 * rank + 2])
    part.dispatcher = AllToAllDispatcher(dist.group.WORLD, num_routed=4, num_uncond=1)
    part.reduce_stats = AllReduceStats()
    torch.manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    cond = torch.tensor([True, rank == 0, True])
    y, aux = part(x, cond)
    y.square().sum().backward()
    recv = part.dispatcher.last_recv_counts.clone()
    sent = aux["counts"].clone()
    dist.all_reduce(recv)
    dist.all_reduce(sent)
    # reference: the same tokens through the full layer on this rank alone
    xr = x.detach().clone().requires_grad_()
    yr, _ = full(xr, cond)
    yr.square().sum().backward()  # backward through the all-to-all equals the local layer's backward
    q.put((rank, torch.allclose(y, yr, atol=1e-12), int(recv.sum()), int(sent.sum()),
           int((cond.sum() * 10 * 2).item()), torch.allclose(x.grad, xr.grad, atol=1e-10), float(x.grad.abs().sum())))
    dist.destroy_process_group()


def spawn_workers(worker, world: int, timeout: float) -> list:
    """``worker(rank, world, port, queue)`` in ``world`` fresh processes; what each put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(30)
    return results


def test_all_to_all_dispatch_is_dropless_and_exact():
    results = spawn_workers(_dispatch_worker, 2, timeout=120)
    total_routed = sum(r[4] for r in results)
    for rank, same, recv, sent, _, same_grad, grad_mass in results:
        assert same, f"rank {rank}: expert-parallel output differs from the local layer"
        assert recv == sent == total_routed  # every routed (token, expert) pair arrived: nothing dropped
        assert same_grad and grad_mass > 0, f"rank {rank}: gradients differ from the local layer"


def _init_deepspeed_worker(rank, world, port):
    """A spawned worker's process group, the way DeepSpeed starts one (gloo, CPU accelerator)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def _grad_norm_worker(rank, world, port, q):
    _init_deepspeed_worker(rank, world, port)  # before promoe_ds imports DeepSpeed's modules
    from promoe_ds.parallel.ep import apply_expert_parallel, create_groups, global_grad_norm, shard_experts

    ep_rank = create_groups(2)
    model = build_model(load_config(TINY, ["model.depth=2"]).model)
    shard_experts(model, 2, ep_rank)
    apply_expert_parallel(model, 2)
    squares = {"dense": 0.0, "expert": 0.0}
    for i, (name, p) in enumerate(model.named_parameters()):
        expert = bool(routed_expert_layer(name))  # a replica's gradients equal, an EP rank's experts its own
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 1000 * ep_rank * expert))
        squares["expert" if expert else "dense"] += p.grad.double().square().sum().item()
    q.put((rank, ep_rank, global_grad_norm(list(model.parameters()), 2).item(), squares))


def test_global_grad_norm_counts_every_gradient_once():
    """ZeRO-0's clipping norm, 4 ranks with ep_size 2 (two replicas of each EP rank): replicated gradients
    once, each EP rank's routed experts once, whatever the replica."""
    results = spawn_workers(_grad_norm_worker, 4, timeout=180)
    dense = {round(sq["dense"], 6) for *_, sq in results}
    experts = {ep: sq["expert"] for _, ep, _, sq in results}
    assert len(dense) == 1 and len(experts) == 2 and all(experts.values())
    want = (dense.pop() + sum(experts.values())) ** 0.5
    for rank, _, norm, _ in results:
        assert norm == pytest.approx(want, rel=1e-6), rank


def _ema_worker(rank, world, port, q):
    _init_deepspeed_worker(rank, world, port)  # before promoe_ds imports DeepSpeed's modules
    from promoe_ds.ema import EMA
    from promoe_ds.parallel.ep import apply_expert_parallel, create_groups, replica_group, shard_experts

    ep_rank = create_groups(2)
    model = build_model(load_config(TINY, ["model.depth=2"]).model)
    shard_experts(model, 2, ep_rank)
    apply_expert_parallel(model, 2)
    ema = EMA(model, 0.9, replicas=replica_group)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}  # the plain EMA, every tensor here
    for step in range(3):  # weights move alike on the ranks that hold the same copy
        with torch.no_grad():
            for i, (n, p) in enumerate(model.named_parameters()):
                seed = 1 + step * 10_000 + i + 1_000_000 * ep_rank * bool(routed_expert_layer(n))
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
                ref[n].lerp_(p.detach(), 0.1)
        ema.update()
    full = ema.state_dict()
    worst = max(float((full[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)
    fresh = EMA(model, 0.9, replicas=replica_group)  # starts from the current weights, then loads the EMA
    fresh.load_state_dict(full)
    round_trip = all(torch.equal(t, full[n]) for n, t in fresh.state_dict().items())
    sizes = {kind: sum(p.numel() for n, p in model.named_parameters() if bool(routed_expert_layer(n)) == kind)
             for kind in (False, True)}
    q.put((rank, ep_rank, worst, round_trip, sum(s.numel() for s in ema.shadow.values()), sizes))


def test_ema_is_sharded_over_replicas_and_gathers_to_the_plain_ema():
    """4 ranks, ep_size 2: the EMA of the dense weights is split over the 4 ranks, each EP rank's experts'
    over its 2 replicas (every tensor kept once per group); the gathered state equals a plain EMA of every
    tensor, and loads back."""
    results = spawn_workers(_ema_worker, 4, timeout=180)
    dense, routed = results[0][5][False], results[0][5][True]
    held = [r[4] for r in results]
    assert sum(held) == dense + 2 * routed  # dense once over all ranks, each EP rank's experts once
    assert max(held) < 0.6 * (dense + routed)  # the unsharded EMA kept dense + routed on every rank
    for rank, _, worst, round_trip, _, _ in results:
        assert worst < 1e-6 and round_trip, rank


def _compiled_ep_worker(rank, world, port, q):
    _init_deepspeed_worker(rank, world, port)  # before promoe_ds imports DeepSpeed's modules
    from promoe_ds.models.dit import compile_model
    from promoe_ds.parallel.ep import apply_expert_parallel, create_groups, shard_experts

    cfg = load_config(TINY, ["model.depth=2", "model.hidden_size=32", "model.num_heads=2"]).model
    model = build_model(cfg).train()
    shard_experts(model, 2, create_groups(2))
    model.set_expert_backend("grouped", "cpu")
    apply_expert_parallel(model, 2)
    with torch.no_grad():  # open adaLN-Zero gates so every weight gets a gradient
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.02)
        model.final_layer.linear.weight.normal_(std=0.02)

    def batch(i):  # each rank its own data; token counts per expert change from step to step
        g = torch.Generator().manual_seed(rank * 100 + i)
        y = torch.tensor([[1, 10, 3, 4], [5, 6, 7, 8], [10, 10, 2, 1]][i])  # the second: no null label
        return torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g) * 1000, y

    def step(fwd, i):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # inductor's grouped GEMM wants bf16
            out, aux = fwd(*batch(i))
            loss = out.float().square().mean() + aux["aux_loss"]
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(*batch(0))
    breaks = {"_send" if "AllToAllDispatcher._send" in str(r.reason) else
              "_return" if "AllToAllDispatcher._return" in str(r.reason) else str(r.reason)[:300]
              for r in explained.break_reasons}
    torch._dynamo.reset()
    compiled = compile_model(model)
    worst = []
    for i in range(3):
        (loss, grads), (loss_c, grads_c) = step(model, i), step(compiled, i)
        worst.append((abs(loss_c - loss) / loss,
                      max(float((grads_c[n] - g).norm() / g.norm()) for n, g in grads.items())))
    q.put((rank, breaks, worst))
    dist.destroy_process_group()


def test_compiled_expert_parallel_only_exchanges_run_eagerly():
    """ep_size 2 under torch.compile: the only graph breaks are the two exchanges (their split sizes
    are read on the host); routing, expert GEMMs and the weighted sum are compiled with the received
    token count dynamic, and loss and gradients match eager over steps with different counts."""
    for rank, breaks, worst in spawn_workers(_compiled_ep_worker, 2, timeout=900):
        assert breaks == {"_send", "_return"}, (rank, breaks)
        for loss_err, grad_err in worst:
            assert loss_err < 1e-4 and grad_err < 3e-2, (rank, worst)


def test_compiled_training_matches_eager_and_resumes_from_its_compile_cache(tmp_path):
    # train.compile=true: the model under torch.compile inside the DeepSpeed engine, the all-to-all
    # dispatch (host-side split sizes) and the loop experts running eagerly between compiled parts.
    # train.compile_cache=auto keeps inductor's cache in <out_dir>/compile_cache: the resumed run loads its
    # graphs from there instead of compiling them again
    common = COMMON + ["train.ckpt_every=3", "train.ep_size=2"]
    run(2, common + ["train.steps=5", f"train.out_dir={tmp_path / 'eager'}"], tmp_path / "log_eager")
    out = tmp_path / "compiled"
    compiled = common + [f"train.out_dir={out}", "train.compile=true"]
    run(2, compiled + ["train.steps=3"], tmp_path / "log_c")
    assert any((out / "compile_cache").rglob("*.py")), "no compiled code in <out_dir>/compile_cache"
    run(2, compiled + ["train.steps=5"], tmp_path / "log_resumed")
    log = (tmp_path / "log_resumed" / "rank0.log").read_text()
    assert "resumed from" in log
    hits = re.search(r"step 4: [\d.]+ s \(torch.compile: (\d+) of \d+ graphs from the cache\)", log)
    assert hits and int(hits[1]) > 0, log[-2000:]
    eager, compiled = metrics(tmp_path / "eager"), metrics(out)
    assert [r["step"] for r in compiled] == [1, 2, 3, 4, 5]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["rcl"] == pytest.approx(a["rcl"], rel=1e-4)


def test_sigterm_or_ctrl_c_then_resume_matches_uninterrupted(tmp_path):
    # the cut lands a few steps after the poll sees step 3 (tiny steps are fast; the stop flag is read one
    # step late): n leaves room for that on a loaded machine, where the cut can land several steps later
    n = 16
    steps = [f"train.steps={n}", "train.ckpt_every=100"]
    run(2, COMMON + steps + [f"train.out_dir={tmp_path / 'ref'}"], tmp_path / "logref")
    ref = {r["step"]: r["loss"] for r in metrics(tmp_path / "ref")}

    out = tmp_path / "cut"
    (tmp_path / "logcut").mkdir()
    procs = launch(2, COMMON + steps + [f"train.out_dir={out}", "train.steps=100000"], log_dir=tmp_path / "logcut")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until it has trained a few steps, then preempt
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
            break
        time.sleep(0.2)
    procs[0].send_signal(signal.SIGTERM)  # a scheduler's preemption
    procs[1].send_signal(signal.SIGINT)  # Ctrl-C
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [99, 99], (tmp_path / "logcut/rank1.log").read_text()[-3000:]
    stopped = int((out / "checkpoints/latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < n
    half_written = out / "checkpoints" / f"step_{n + 1:08d}"  # what a crash during a save leaves: no meta.json
    (half_written / "promoe").mkdir(parents=True)
    run(2, COMMON + steps + [f"train.out_dir={out}"], tmp_path / "logres")
    assert not half_written.exists()
    assert f"resumed from step_{stopped:08d} at step {stopped}" in (tmp_path / "logres/rank0.log").read_text()
    resumed = {r["step"]: r["loss"] for r in metrics(out) if r["step"] > stopped}
    assert sorted(resumed) == list(range(stopped + 1, n + 1))
    for s, loss in resumed.items():
        assert loss == ref[s], f"step {s}: resumed {loss} != uninterrupted {ref[s]}"


def test_bf16_weights_train_bit_for_bit_as_autocast_and_resume(tmp_path):
    """train.bf16_weights (GEMM weights stored in bf16, float32 masters in AdamWEMA) trains exactly as float32
    weights under bf16 autocast (CPU autocast here; clipping on): the same losses and, in the checkpoint, the same
    float32 weights and EMA, also through a resume (the masters come back from the checkpoint's float32 files,
    not from the bf16 weights). Two ranks with expert parallelism (DeepSpeed reducing bf16 gradients): close."""
    base = COMMON + ["train.zero_stage=0", "train.fused_ema=true", "train.precision=bf16", "train.ckpt_every=2",
                     "model.moe.backend=grouped"]
    ours = base + ["train.ep_size=1", "train.bf16_weights=true", f"train.out_dir={tmp_path / 'bf16'}"]
    run(1, base + ["train.ep_size=1", "train.steps=4", f"train.out_dir={tmp_path / 'ref'}"], tmp_path / "log_ref")
    run(1, ours + ["train.steps=2"], tmp_path / "log_a")
    run(1, ours + ["train.steps=4"], tmp_path / "log_b")
    assert "bf16 autocast, bf16 weights" in (tmp_path / "log_a/rank0.log").read_text()
    assert "resumed from step_00000002 at step 2" in (tmp_path / "log_b/rank0.log").read_text()
    ref, got = metrics(tmp_path / "ref"), metrics(tmp_path / "bf16")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref] and ref[0]["loss"] != ref[-1]["loss"]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    want, _ = load_full(tmp_path / "ref/checkpoints/step_00000004")
    have, _ = load_full(tmp_path / "bf16/checkpoints/step_00000004")
    assert want.keys() == have.keys()
    for name in want:
        assert have[name].dtype == torch.float32 and torch.equal(have[name], want[name]), name
    w1 = have["blocks.1.mlp.routed_experts.w1"]
    assert not torch.equal(w1, w1.bfloat16().float())  # the masters were written, not their bf16 copies
    run(2, base + ["train.ep_size=2", "train.bf16_weights=true", "train.steps=2", f"train.out_dir={tmp_path / 'ep2'}"],
        tmp_path / "log_ep2")
    for a, b in zip(ref, metrics(tmp_path / "ep2")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a, b)


def test_bf16_weights_config_errors():
    def build(*over, on_gpu=False):
        return build_ds_config(load_config(TINY, ["train.zero_stage=0", *over]).train, 1, on_gpu=on_gpu)

    assert build("train.fused_ema=true", "train.bf16_weights=true", on_gpu=True)["torch_autocast"]["enabled"]
    for over, on_gpu, needle in [
        (["train.bf16_weights=true", "train.precision=bf16"], False, "needs train.fused_ema=true"),
        (["train.fused_ema=true", "train.bf16_weights=true"], False, "needs bf16 autocast .* on the CPU"),
        (["train.fused_ema=true", "train.bf16_weights=true", "train.precision=fp32"], True, "needs bf16 autocast"),
        (["train.fused_ema=true", "train.bf16_weights=true", "train.micro_batch=4"], True,
         "gradients would add up in bf16 over 4"),
    ]:
        with pytest.raises(ConfigError, match=f"train.bf16_weights: {needle}"):
            build(*over, on_gpu=on_gpu)


def test_noncontiguous_gradients_with_expert_parallel_are_refused():
    """DeepSpeed's contiguous_gradients=false path reduces expert gradients over all ranks (ZeRO-1, ep_size 2:
    the routed-expert weights leave the single-process reference within 3 steps); with ep_size 1 the file is
    fine."""
    variant = "train.ds_config=bench/ds_variants/zero1_no_hooks.json"
    one = load_config(TINY, [variant, "train.ep_size=1"]).train
    assert build_ds_config(one, 2, on_gpu=False)["zero_optimization"]["contiguous_gradients"] is False
    with pytest.raises(ConfigError, match="contiguous_gradients .* false is wrong with train.ep_size=2"):
        build_ds_config(load_config(TINY, [variant, "train.ep_size=2"]).train, 2, on_gpu=False)


def test_deepspeed_throughput_timer_is_off_unless_the_base_json_asks(tmp_path):
    """DeepSpeed's throughput timer synchronises the device at each engine forward and step(): off by default,
    read the way DeepSpeed reads it; a base JSON's own "timers" section wins."""
    from deepspeed.utils.config import get_timers_config

    assert get_timers_config(build_ds_config(load_config(TINY, []).train, 1, on_gpu=True)).enabled is False
    mine = tmp_path / "timed.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 1}, "timers": {"throughput": {"enabled": True}}}))
    timed = build_ds_config(load_config(TINY, [f"train.ds_config={mine}"]).train, 1, on_gpu=True)
    assert get_timers_config(timed).enabled is True


def test_resume_errors_name_the_checkpoint_and_what_to_do(tmp_path):
    """Resuming with other model settings, or from a tag with a truncated file: one `error:` line (exit 2)."""
    out = tmp_path / "run"
    base = COMMON + ["train.ep_size=1", "train.zero_stage=0", "train.steps=2", "train.ckpt_every=1",
                     f"train.out_dir={out}"]
    run(1, base, tmp_path / "log")

    (tmp_path / "log_resume").mkdir()

    def resume(*overrides):
        procs = launch(1, base + ["train.steps=3", *overrides], log_dir=tmp_path / "log_resume")
        assert procs[0].wait(timeout=300) == 2
        return [line for line in (tmp_path / "log_resume/rank0.log").read_text().splitlines() if "error:" in line]

    err = resume("model.hidden_size=32")
    assert len(err) == 1 and "step_00000002' holds" in err[0]
    assert "model.hidden_size: 64 in the checkpoint, 32 here" in err[0]
    dense = out / "checkpoints/step_00000002/promoe/dense.pt"
    dense.write_bytes(dense.read_bytes()[:1000])
    err = resume()
    assert len(err) == 1 and f"cannot read '{dense}'" in err[0], err
    assert f"train.resume={out / 'checkpoints/step_00000001'}" in err[0], err


@pytest.mark.parametrize("override,needle", [
    ("train.ep_size=3", "train.ep_size"),
    ("train.global_batch=7 train.micro_batch=2", "train.global_batch"),
    ("data.source=wds data.path=/nonexistent", "data.path"),
    ("train.ds_config=ds_configs/bad_test.json", "unknown ds_config key"),
    ("train.zero_stage=1 train.offload_optimizer=true", "train.offload_optimizer: needs train.zero_stage=2"),
    ("train.compile=true train.cuda_graphs=true", "train.cuda_graphs: needs CUDA GPUs"),
    ("train.fused_ema=true", "train.fused_ema: needs ZeRO-0"),
    ("train.out_dir=configs/tiny_cpu.yaml/run", "train.out_dir: cannot create"),
    ("train.compile=true train.compile_cache=", "train.compile_cache: auto, none or a directory"),
    ("wandb.mode=online", "wandb.mode=online"),  # no API key here
])
def test_bad_configs_fail_before_training(tmp_path, override, needle):
    bad_config_fails(tmp_path, override, needle)


def test_no_compiler_for_deepspeeds_cpu_op_is_one_error_line(tmp_path):
    bad_config_fails(tmp_path, "", "needs a C++ compiler", CXX=str(tmp_path / "no-such-c++"))


def bad_config_fails(tmp_path, override, needle, **env):
    bad = REPO / "ds_configs" / "bad_test.json"
    if "bad_test" in override:
        bad.write_text('{"zero_optimization": {"stage": 2}, "trian_batch_size": 8}')
    try:
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()), **env)
        env.pop("WANDB_API_KEY", None)
        r = subprocess.run([sys.executable, "-m", "promoe_ds.cli", "train", "--config", "configs/tiny_cpu.yaml",
                            f"train.out_dir={tmp_path}", "train.ep_size=1", *override.split()], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    finally:
        bad.unlink(missing_ok=True)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()
