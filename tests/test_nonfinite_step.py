"""A step with a non-finite loss is skipped exactly: real DeepSpeed engine, 2 gloo processes, ep_size 2.

The bad value comes from the data, as it would in a real run: one sample of a WebDataset shard stores a
log-variance of 100, a finite latent of ~1e21 whose squared error overflows float32, placed where rank 1
reads it as micro-batch ``micro`` of step 2; rank 0 only reads ordinary latents. (A NaN or inf stored in a
shard never reaches the model: the loader skips it as a bad sample, the last case.) Every step writes a
checkpoint, so the test compares what the trainer itself saved: weights and EMA (``promoe/*.pt``) and each
rank's ZeRO partition of the optimizer (fp32 master weights, AdamW moments and step count; ZeRO-0: each EP
rank's AdamW state) after step 1 and after the skipped step 2 must be bit-identical; step 3 trains normally.
"""
import numpy as np
import pytest
import torch

from data_prep.encode import write_manifest, write_shard
from promoe_ds.config import DataConfig

from dist_utils import launch, metrics

pytestmark = pytest.mark.slow

SHAPE = (4, 8, 8)  # configs/tiny_cpu.yaml: 4 channels, 8x8 latents
SCALE = 0.5
SEED = 3
LOUD = 100.0  # a log-variance: latents ~ exp(50) * scale, finite; their squared error overflows float32


def write_shards(root, bad_id=None, bad_value=LOUD, ids=False):
    """4 shards x 12 samples. ``ids``: mean = sample id + 1 and no noise, so a loaded latent names its
    sample; else random latents, sample ``bad_id`` with the log-variance ``bad_value`` if that is finite, else
    with one value of its mean ``bad_value``. The order in which a rank reads the samples does not depend on
    their values."""
    entries = []
    for s in range(4):
        samples = []
        for k in range(12 * s, 12 * s + 12):
            if ids:
                mean, logvar = np.full((2, *SHAPE), k + 1, np.float16), np.full((2, *SHAPE), -30, np.float16)
            else:
                mean = np.random.default_rng(k).standard_normal((2, *SHAPE)).astype(np.float16)
                logvar = np.full((2, *SHAPE), -2, np.float16)
                if k == bad_id and np.isfinite(bad_value):
                    logvar[:] = bad_value  # both views
                elif k == bad_id:
                    mean[:, 1, 2, 3] = bad_value  # both views: one corrupt value in the latent
            samples.append({"__key__": f"{k:08d}", "mean.npy": mean, "logvar.npy": logvar, "cls": k % 10,
                            "src": f"c/{k}.JPEG"})
        entries.append(write_shard(root / f"shard-{s:06d}.tar", samples))
    write_manifest(root, entries, vae="fake", image_size=64, scale_factor=SCALE, latent_shape=SHAPE,
                   num_classes=10, skipped=[])


def rank_batches(root, rank, micro, n):
    """The first ``n`` micro-batches of ``rank``'s stream, read with the trainer's loader and settings."""
    from promoe_ds.data import build_latent_source

    cfg = DataConfig(source="wds", path=str(root), num_workers=0, shuffle_buffer=8, resampled=False)
    src = build_latent_source(cfg, latent_shape=SHAPE, num_classes=10, micro_batch=micro, rank=rank, world_size=2,
                              seed=SEED)
    return [src.next_batch()[0] for _ in range(n)]


def make_data(root, micro, gas, bad_micro, bad_value):
    """Shards where rank 1 reads the bad sample in micro-batch ``bad_micro`` of step 2, rank 0 none; the
    overrides that read them and the bad sample's key."""
    root.mkdir()
    bad_batch = gas + bad_micro  # step 2 (1-based) = micro-batches gas .. 2*gas-1
    write_shards(root, ids=True)
    z = rank_batches(root, 1, micro, bad_batch + 1)[bad_batch][0]
    bad_id = int(round(z.abs().mean().item() / SCALE)) - 1
    write_shards(root, bad_id, bad_value)
    for rank in (0, 1):
        ordinary = [bool(b.abs().max() < 1e3) for b in rank_batches(root, rank, micro, 3 * gas)]
        skipped = not np.isfinite(bad_value)  # by the loader
        assert ordinary == [rank == 0 or skipped or i != bad_batch for i in range(3 * gas)], (rank, ordinary)
    return ["data.source=wds", f"data.path={root}", "data.num_workers=0", "data.shuffle_buffer=8",
            "data.resampled=false"], f"{bad_id:08d}"


# name: ZeRO stage, gradient accumulation, micro-batch of step 2 that rank 1 reads the bad latent in, its value
CASES = {
    "zero2-gas1": (2, 1, 0, LOUD),  # a zero-gradient AdamW step would still move weights and moments
    "zero2-gas2": (2, 2, 1, LOUD),  # step 2's first micro-batch is fine: its gradient must not be applied
    "zero1-gas2": (1, 2, 0, LOUD),  # ZeRO-1: gradients reduced at the boundary only
    "zero0-gas2": (0, 2, 1, LOUD),  # ZeRO-0: the skip is the fused AdamW's found_inf (train.clip_in_adamw)
    "zero0-fused-gas2": (0, 2, 1, LOUD),  # train.fused_ema: AdamWEMA skips on the host's overflow flag
    "zero0-fused-bf16-gas1": (0, 1, 0, LOUD),  # train.bf16_weights: no bf16 copy written, masters untouched
    "abort": (2, 1, 0, LOUD),       # train.max_bad_steps=1
    "zero2-warmup": (2, 1, 0, LOUD),  # WARMUP: LR warm-up, logs and a checkpoint only after step 4
    "zero0-warmup": (0, 1, 0, LOUD),  # ZeRO-0 (the skip reported to DeepSpeed by the trainer)
    "nan-sample": (2, 1, 0, float("nan")),  # a NaN stored in the shard: a bad sample, no step skipped
}
WARMUP = ["train.steps=4", "train.log_every=4", "train.ckpt_every=4", "train.warmup_steps=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's 2-process run, all started at once (start-up dominates and leaves the cores half idle)."""
    started = {}
    for name, (zero, gas, bad_micro, bad_value) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        micro = 4 // gas
        data, bad_key = make_data(d / "shards", micro, gas, bad_micro, bad_value)
        overrides = data + [
            "train.global_batch=8", f"train.micro_batch={micro}", f"train.zero_stage={zero}", "train.ep_size=2",
            f"train.seed={SEED}", "train.steps=3", "train.log_every=1", "train.ckpt_every=1", "train.keep_last=10",
            "objective.class_dropout=0.25", f"train.out_dir={d / 'run'}"]
        if "fused" in name:
            overrides.append("train.fused_ema=true")
        if "bf16" in name:
            overrides += ["train.bf16_weights=true", "train.precision=bf16"]
        if name == "abort":
            overrides.append("train.max_bad_steps=1")
        if name.endswith("-warmup"):
            overrides += WARMUP
        (d / "log").mkdir()
        started[name] = (d, launch(2, overrides, log_dir=d / "log"), bad_key)
    yield started
    for _, procs, _ in started.values():
        for p in procs:
            p.kill()


def finish(runs, name):
    """(run dir, log dir, exit codes) of a case's run, once both ranks have exited."""
    d, procs, _ = runs[name]
    return d / "run", d / "log", [p.wait(timeout=300) for p in procs]


def saved_state(tag_dir):
    """Every tensor a step may change, from the trainer's checkpoint: weights and EMA of all parameters,
    and each rank's ZeRO optimizer partition (fp32 master weights, AdamW exp_avg / exp_avg_sq / step)."""
    out = {}
    for f in sorted((tag_dir / "promoe").glob("[de]*.pt")):  # dense.pt, experts_ep*.pt
        d = torch.load(f)
        for name, e in d.get("params", d).items():
            out[f"{f.stem}:{name}:model"], out[f"{f.stem}:{name}:ema"] = e["model"], e["ema"]
    for f in sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        osd = torch.load(f, weights_only=False)["optimizer_state_dict"]
        for group, state in osd["base_optimizer_state"]["state"].items():
            out.update({f"{f.stem}:{group}:{k}": v for k, v in state.items()})
        out.update({f"{f.stem}:{g}:fp32": w for g, w in enumerate(osd["single_partition_of_fp32_groups"])})
    for f in sorted(tag_dir.glob("expp_rank_*_optim_states.pt")):  # ZeRO-0
        for i, state in torch.load(f, weights_only=False)["optimizer"]["state"].items():
            out.update({f"{f.stem}:{i}:{k}": v for k, v in state.items()})
    return out


def engine_counters(tag_dir):
    m = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    return m["global_steps"], m["skipped_steps"]


@pytest.mark.parametrize("name", ["zero2-gas1", "zero2-gas2", "zero1-gas2", "zero0-gas2", "zero0-fused-gas2",
                                  "zero0-fused-bf16-gas1"])
def test_nonfinite_step_leaves_weights_optimizer_and_ema_untouched(runs, name):
    out, log, codes = finish(runs, name)
    assert codes == [0, 0], (log / "rank0.log").read_text()[-3000:]
    assert ("bf16 autocast, bf16 weights" in (log / "rank0.log").read_text()) == ("bf16" in name)
    tags = [out / f"checkpoints/step_{s:08d}" for s in (1, 2, 3)]
    s1, s2, s3 = map(saved_state, tags)
    assert s1.keys() == s2.keys() == s3.keys() and any(":ema" in k for k in s1) and any(":exp_avg" in k for k in s1)
    for k in s1:  # the skipped step changed nothing, bit for bit
        assert torch.equal(s2[k], s1[k]), f"step 2 was skipped but changed {k}"
    # DeepSpeed itself counted it as a skipped (overflow) step; its step counter moved on
    assert [engine_counters(t) for t in tags] == [(1, 0), (2, 1), (3, 1)]
    # step 3 trains normally: AdamW's bias-correction count goes 1 -> 1 -> 2, everything moves
    adam_steps = [{k: int(s[k]) for k in s if k.endswith(":step")} for s in (s1, s2, s3)]
    assert adam_steps[0] and all(set(a.values()) == {n} for a, n in zip(adam_steps, (1, 1, 2)))
    optim = [k for k in s3 if k.endswith((":exp_avg", ":exp_avg_sq", ":fp32"))]
    moved = [k for k in optim if s3[k].any()]  # ZeRO-0's per-parameter states: adaLN-Zero keeps some grads 0 so far
    assert len(moved) > len(optim) // 2
    for k in moved:
        assert not torch.equal(s3[k], s2[k]) and s3[k].isfinite().all(), k
    for param in ("dense:x_embedder.weight", "experts_ep0001:blocks.1.mlp.routed_experts.w1"):
        for what in (":model", ":ema"):
            assert not torch.equal(s3[param + what], s2[param + what]), param + what
    rows = metrics(out)
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in rows] == [(1, 0, 0), (2, 1, 1), (3, 0, 1)]
    assert np.isfinite(rows[0]["loss"]) and np.isfinite(rows[2]["loss"]) and rows[2]["grad_norm"] > 0
    assert "loss" not in rows[1] and "expert_load" not in rows[1]  # logged as skipped, not as a loss of 0
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row, 1 total)" in \
        (log / "rank0.log").read_text()


def test_max_bad_steps_aborts_with_a_clear_message(runs):
    out, log, codes = finish(runs, "abort")
    text = [(log / f"rank{r}.log").read_text() for r in (0, 1)]
    assert all(codes), (codes, text[0][-3000:])
    for t in text:  # every rank stops at the same step with the same message
        assert ("RuntimeError: step 2: 1 step(s) in a row skipped for a non-finite loss or gradient: aborting "
                f"(train.max_bad_steps=1); last good checkpoint in {out / 'checkpoints'}") in t, t[-3000:]
    assert (out / "checkpoints/latest").read_text().strip() == "step_00000001"
    assert [r["step"] for r in metrics(out)] == [1]


def test_zero0_skips_like_zero2_under_lr_warmup(runs):
    """The skipped step 2 holds the LR warm-up and counts as skipped under ZeRO-0 as under ZeRO-2, and the
    weights and EMA after step 4 agree."""
    (o2, _, c2), (o0, log0, c0) = finish(runs, "zero2-warmup"), finish(runs, "zero0-warmup")
    assert c2 == c0 == [0, 0], (log0 / "rank0.log").read_text()[-3000:]
    r2, r0 = metrics(o2), metrics(o0)
    assert [(r["step"], r["skipped_steps"]) for r in r0] == [(r["step"], r["skipped_steps"]) for r in r2] == [(4, 1)]
    assert r0[0]["lr"] == r2[0]["lr"] == pytest.approx(3e-4 * 2 / 10)  # WarmupLR after 3 updates (4: 3e-4 * 3 / 10)
    assert r0[0]["loss"] == pytest.approx(r2[0]["loss"], rel=1e-5)
    tag2, tag0 = o2 / "checkpoints/step_00000004", o0 / "checkpoints/step_00000004"
    assert engine_counters(tag0) == engine_counters(tag2) == (4, 1)
    s2, s0 = saved_state(tag2), saved_state(tag0)
    weights = [k for k in s2 if k.endswith((":model", ":ema"))]
    assert weights and set(weights) <= s0.keys()
    for k in weights:
        torch.testing.assert_close(s0[k], s2[k], rtol=1e-4, atol=1e-6, msg=k)
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row, 1 total)" in \
        (log0 / "rank0.log").read_text()


def test_a_nonfinite_latent_is_a_bad_sample_named_once(runs):
    """A NaN stored in a shard: the loader skips the sample (counted in data/bad_samples over all ranks, its shard
    and key warned of once), so no step is skipped for it."""
    out, log, codes = finish(runs, "nan-sample")
    assert codes == [0, 0], (log / "rank1.log").read_text()[-3000:]
    rows = metrics(out)
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in rows] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert rows[-1]["data/bad_samples"] == 1 and all(np.isfinite(r["loss"]) for r in rows)  # read ahead: by step 1 or 2
    warnings = [line for line in (log / "rank1.log").read_text().splitlines() if "non-finite latent" in line]
    key = runs["nan-sample"][2]
    assert len(warnings) == 1 and f"skipping sample {key} in " in warnings[0] and ".tar" in warnings[0], warnings
