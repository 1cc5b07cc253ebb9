"""Resume on another layout (world size, ep_size, ZeRO stage, gradient accumulation) and bounded hangs: real
DeepSpeed engines, several gloo processes on the CPU."""
import shutil
import signal
import time

import pytest
import torch

from dist_utils import launch, metrics, run

pytestmark = pytest.mark.slow

COMMON = ["train.global_batch=8", "train.log_every=1", "train.seed=3", "objective.class_dropout=0.25"]


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_dead_rank_ends_the_others_within_the_collective_timeout(tmp_path, sig):
    """SIGSTOP (a frozen node) or SIGKILL (a dead one) one of 2 ranks mid-run: the other exits 98 within
    train.collective_timeout (killed: at once, its connection closes) with one line naming the step and what it
    waited in; the last complete checkpoint stays the resume point."""
    timeout = 15
    out = tmp_path / "run"
    (tmp_path / "log").mkdir()
    procs = launch(2, COMMON + ["train.steps=100000", "train.ckpt_every=3", f"train.collective_timeout={timeout}",
                                f"train.out_dir={out}"], log_dir=tmp_path / "log")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints/latest").is_file():
            assert all(p.poll() is None for p in procs), (tmp_path / "log/rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        assert (out / "checkpoints/latest").is_file(), (tmp_path / "log/rank0.log").read_text()[-3000:]
        procs[1].send_signal(sig)
        stopped = time.time()
        code = procs[0].wait(timeout=timeout + 60)
        took = time.time() - stopped
    finally:
        procs[1].send_signal(signal.SIGCONT)
        for p in procs:
            p.kill()
            p.wait()
    log = (tmp_path / "log/rank0.log").read_text()
    assert code == 98, log[-3000:]
    assert (timeout <= took if sig == signal.SIGSTOP else took < 10) and took < timeout + 15, took
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert (out / "hang.txt").read_text().strip() == errors[0].strip()  # what the Slurm template reads
    why = f"train.collective_timeout={timeout} s" if sig == signal.SIGSTOP else "lost another rank"
    assert "rank 0: step " in errors[0] and why in errors[0], errors[0]
    assert any(w in errors[0] for w in ("in the forward", "in the backward", "in the optimizer", "in the stop")), errors
    latest = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
    assert (latest / "meta.json").is_file()


def load_full(tag_dir) -> dict:
    """Every parameter's entries (model, ema, exp_avg, exp_avg_sq, step) from a checkpoint's promoe/ files, the
    routed experts of all EP ranks concatenated by global id."""
    own = tag_dir / "promoe"
    state = torch.load(own / "dense.pt")
    parts = sorted((torch.load(f) for f in own.glob("experts_ep*.pt")), key=lambda f: f["ep_rank"])
    for name in parts[0]["params"] if parts else []:
        entries = [f["params"][name] for f in parts]
        state[name] = {k: (max(e[k] for e in entries) if k == "step" else torch.cat([e[k] for e in entries]))
                       for k in entries[0]}
    return state


def assert_same_state(got: dict, want: dict, keys=("model", "ema", "exp_avg", "exp_avg_sq", "step")):
    assert got.keys() == want.keys()
    for name in want:
        for k in keys:
            if k == "step":
                assert got[name][k] == want[name][k], (name, got[name][k], want[name][k])
            else:  # float32 in other reduction orders, relative to each tensor's largest entry (moments are tiny in
                # the first steps); weights 1e-3: AdamW moves an entry whose gradient is float noise by ~lr either way
                scale = float(want[name][k].abs().max())
                tol = 1e-3 if k in ("model", "ema") else 1e-4
                torch.testing.assert_close(got[name][k], want[name][k], rtol=1e-4, atol=tol * scale + 1e-30,
                                           msg=f"{name} {k}")


def assert_same_curve(got: list[dict], want: list[dict], steps: list[int]):
    got, want = {r["step"]: r for r in got}, {r["step"]: r for r in want}
    for s in steps:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5, abs=1e-7), s
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4), s
        assert got[s]["lr"] == pytest.approx(want[s]["lr"], rel=1e-6), s


def resume_copy(src, dst, n: int, overrides: list[str], log_dir):
    """``src``'s run directory copied to ``dst`` and resumed there on ``n`` ranks; its rank-0 log."""
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()  # the resumed run's steps only
    run(n, overrides + [f"train.out_dir={dst}"], log_dir)
    return (log_dir / "rank0.log").read_text()


def test_resume_on_other_world_size_ep_size_and_zero_stage(tmp_path):
    """2 ranks, ep_size 2, ZeRO-2 train 4 steps and checkpoint; resumed on 1 rank (ep 1, ZeRO-0) and on 4 ranks
    (ep 4, ZeRO-1) to step 6: losses, gradient norms and learning rates (a warmup schedule) equal to an
    uninterrupted 1-rank run's; weights, EMA and AdamW moments and step counts equal at the switch and at the
    end. (The zero-initialised output layer and adaLN gates hold the gradients of the inner layers at 0 for the
    first steps: by step 4 the routed experts' moments are non-zero.)"""
    base = COMMON + ["train.warmup_steps=10", "train.ckpt_every=4"]
    run(1, base + ["train.steps=6", "train.ep_size=1", "train.zero_stage=0", f"train.out_dir={tmp_path / 'ref'}"],
        tmp_path / "log_ref")
    run(2, base + ["train.steps=4", "train.ep_size=2", "train.zero_stage=2", f"train.out_dir={tmp_path / 'two'}"],
        tmp_path / "log_two")
    ref = metrics(tmp_path / "ref")
    assert_same_curve(metrics(tmp_path / "two"), ref, [1, 2, 3, 4])
    at_switch = load_full(tmp_path / "ref/checkpoints/step_00000004")
    assert_same_state(load_full(tmp_path / "two/checkpoints/step_00000004"), at_switch)
    w1 = at_switch["blocks.1.mlp.routed_experts.w1"]
    assert w1["step"] == 4.0 and (w1["exp_avg"].abs().sum(dim=(1, 2)) > 0).sum() >= 3  # experts that had tokens
    at_end = load_full(tmp_path / "ref/checkpoints/step_00000006")
    for n, layout in [(1, ["train.ep_size=1", "train.zero_stage=0"]), (4, ["train.ep_size=4", "train.zero_stage=1"])]:
        out = tmp_path / f"on{n}"
        log = resume_copy(tmp_path / "two", out, n, base + ["train.steps=6", *layout], tmp_path / f"log_on{n}")
        assert f"resumed from step_00000004 at step 4 on another layout: world_size 2 -> {n}" in log, log[-2000:]
        assert "AdamW state" in log
        assert [r["step"] for r in metrics(out)] == [5, 6]
        assert_same_curve(metrics(out), ref, [5, 6])
        assert_same_state(load_full(out / "checkpoints/step_00000006"), at_end)


def test_resume_with_gradient_accumulation_on_one_side(tmp_path):
    """2 ranks ZeRO-2 with 2 micro-batches a step, resumed on 1 rank without accumulation: the same curve and
    state as a 1-rank run without it (the RCL off: its statistics are those of a micro-batch)."""
    base = COMMON + ["train.ckpt_every=3", "model.moe.rcl_weight=0"]
    run(1, base + ["train.steps=5", "train.ep_size=1", "train.zero_stage=0", f"train.out_dir={tmp_path / 'ref'}"],
        tmp_path / "log_ref")
    run(2, base + ["train.steps=3", "train.ep_size=2", "train.micro_batch=2", f"train.out_dir={tmp_path / 'ga'}"],
        tmp_path / "log_ga")
    ref = metrics(tmp_path / "ref")
    assert "micro-batch 2 x grad-accum 2" in (tmp_path / "log_ga/rank0.log").read_text()
    assert_same_curve(metrics(tmp_path / "ga"), ref, [1, 2, 3])
    assert_same_state(load_full(tmp_path / "ga/checkpoints/step_00000003"),
                      load_full(tmp_path / "ref/checkpoints/step_00000003"))
    log = resume_copy(tmp_path / "ga", tmp_path / "one", 1, base + ["train.steps=5", "train.ep_size=1",
                                                                    "train.zero_stage=0"], tmp_path / "log_one")
    assert "micro_batch 2 -> 8, grad_accum 2 -> 1" in log, log[-2000:]
    assert_same_curve(metrics(tmp_path / "one"), ref, [4, 5])
    assert_same_state(load_full(tmp_path / "one/checkpoints/step_00000005"),
                      load_full(tmp_path / "ref/checkpoints/step_00000005"))


def test_resume_onto_a_layout_that_cannot_hold_the_model_is_one_error_line(tmp_path):
    """ep_size 3 does not divide the 4 routed experts; another global batch is refused too."""
    out = tmp_path / "run"
    run(1, COMMON + ["train.steps=1", "train.ckpt_every=1", "train.ep_size=1", f"train.out_dir={out}"],
        tmp_path / "log")
    (tmp_path / "log3").mkdir()
    procs = launch(3, COMMON + ["train.steps=2", "train.ep_size=3", f"train.out_dir={out}"], log_dir=tmp_path / "log3")
    assert [p.wait(timeout=300) for p in procs] == [2, 2, 2]
    log = (tmp_path / "log3/rank0.log").read_text()
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in log, log[-2000:]
    assert "train.ep_size: 3 does not divide the 4 routed experts" in errors[0], errors
    procs = launch(1, COMMON + ["train.steps=2", "train.global_batch=16", "train.ep_size=1", f"train.out_dir={out}"],
                   log_dir=tmp_path / "log3")
    assert procs[0].wait(timeout=300) == 2
    errors = [line for line in (tmp_path / "log3/rank0.log").read_text().splitlines() if "error:" in line]
    assert len(errors) == 1 and "train.global_batch: 16, but checkpoint" in errors[0], errors


def test_resume_on_fewer_ranks_reading_shards_reports_the_data_position(tmp_path):
    """WebDataset shards, 2 ranks -> 1 rank: the resumed run says how its data position carried over and
    trains on (the position arithmetic itself: tests/test_data.py)."""
    from test_nonfinite_step import write_shards

    root = tmp_path / "shards"
    root.mkdir()
    write_shards(root)  # 4 shards x 12 samples
    data = ["data.source=wds", f"data.path={root}", "data.num_workers=0", "data.shuffle_buffer=4",
            "data.resampled=false", "train.ckpt_every=2"]
    run(2, COMMON + data + ["train.steps=2", "train.ep_size=2", f"train.out_dir={tmp_path / 'run'}"],
        tmp_path / "log2")
    run(1, COMMON + data + ["train.steps=3", "train.ep_size=1", f"train.out_dir={tmp_path / 'run'}"],
        tmp_path / "log1")
    log = (tmp_path / "log1/rank0.log").read_text()
    assert "on another layout: world_size 2 -> 1, ep_size 2 -> 1, micro_batch 4 -> 8" in log, log[-2000:]
    line = next(line for line in log.splitlines() if line.startswith("data: another reading layout"))
    # 8 samples read per rank, none of its 12-sample shards in full: all 4 are read again, the 16 samples repeat
    assert ("(2 ranks x 1 workers, micro-batch 4 -> 1 x 1, 8): epoch 0 continues with the 4 shard reads not yet done"
            in line and "at most 16 samples of it repeat and at most 0 are left out" in line), line
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.gpu
def test_resume_from_zero2_onto_zero0_with_fused_ema_on_a_gpu(tmp_path):
    """One GPU, bf16 autocast: a ZeRO-2 checkpoint resumed with ZeRO-0 and train.fused_ema (AdamWEMA: the step
    counts and moments on the GPU, where torch's fused AdamW keeps them) continues as an uninterrupted ZeRO-0
    fused run (bf16 rounding: looser than on the CPU)."""
    base = COMMON + ["train.ep_size=1", "train.ckpt_every=2", "train.warmup_steps=10", "train.precision=bf16"]
    fused = ["train.zero_stage=0", "train.fused_ema=true"]
    run(1, base + fused + ["train.steps=4", f"train.out_dir={tmp_path / 'ref'}"], tmp_path / "log_ref")
    run(1, base + ["train.zero_stage=2", "train.steps=2", f"train.out_dir={tmp_path / 'z2'}"], tmp_path / "log_z2")
    run(1, base + fused + ["train.steps=4", f"train.out_dir={tmp_path / 'z2'}"], tmp_path / "log_res")
    assert "on another layout: zero_stage 2 -> 0" in (tmp_path / "log_res/rank0.log").read_text()
    ref, got = {r["step"]: r for r in metrics(tmp_path / "ref")}, {r["step"]: r for r in metrics(tmp_path / "z2")}
    for s in (3, 4):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=2e-3) and got[s]["lr"] == ref[s]["lr"], s
    want = load_full(tmp_path / "ref/checkpoints/step_00000004")
    have = load_full(tmp_path / "z2/checkpoints/step_00000004")
    for name in want:
        assert have[name]["step"] == want[name]["step"] == 4.0, name
        for k in ("model", "exp_avg", "exp_avg_sq"):
            scale = float(want[name][k].abs().max())
            torch.testing.assert_close(have[name][k], want[name][k], rtol=1e-2, atol=1e-2 * scale + 1e-30,
                                       msg=f"{name} {k}")
