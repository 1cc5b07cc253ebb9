"""No run loses data: one job per run directory, one run's checkpoints in it, full disks named. Real training
processes (gloo on the CPU), real files, a size-limited tmpfs and /dev/full for the failing writes."""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promoe_ds.checkpoint import check_layout
from promoe_ds.config import ConfigError
from promoe_ds.export import consolidate, export, find_tag_dir

from dist_utils import TINY, launch, metrics, run, spawn_local

pytestmark = pytest.mark.slow

ONE = ["train.ep_size=1", "train.zero_stage=0", "train.global_batch=8", "train.log_every=1"]


def tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def latest(out: Path) -> str:
    return (out / "checkpoints/latest").read_text().strip()


def digest(tag_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(tag_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def refused(n: int, overrides: list[str], log_dir: Path, code: int = 2) -> list[str]:
    """Start ``n`` ranks that must stop with exit ``code``; every rank's one `error:` line."""
    log_dir.mkdir(parents=True)
    procs = launch(n, overrides, log_dir=log_dir)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(log_dir / f"rank{r}.log").read_text() for r in range(n)]
    assert codes == [code] * n, logs[0][-3000:]
    errors = [[line for line in text.splitlines() if line.startswith("error:")] for text in logs]
    assert all(len(e) == 1 for e in errors), logs
    assert all("Traceback" not in text for text in logs), logs[0][-3000:]
    return [e[0] for e in errors]


def test_a_new_run_never_deletes_or_mixes_with_the_checkpoints_in_its_directory(tmp_path):
    """A run from step 0 into a directory with another run's checkpoints (train.resume=none, train.init_from) is
    refused; train.overwrite=true moves them aside, and the new run's retention keeps its own newest tags."""
    out = tmp_path / "run"
    run(1, ONE + ["train.steps=4", "train.ckpt_every=2", f"train.out_dir={out}"], tmp_path / "log_old")
    before = {t: digest(out / "checkpoints" / t) for t in tags(out)}
    assert list(before) == ["step_00000002", "step_00000004"]
    weights = tmp_path / "old.safetensors"
    export(out, weights)
    new = ONE + ["train.steps=3", "train.ckpt_every=1", "train.keep_last=2", "train.resume=none", "train.seed=5",
                 f"train.out_dir={out}"]
    for i, extra in enumerate([[], [f"train.init_from={weights}"]]):
        err = refused(1, new + extra, tmp_path / f"log_refused{i}")[0]
        assert (f"train.out_dir: '{out}' holds checkpoints of another run (step_00000002, step_00000004) and this "
                "run starts from step 0") in err and "train.overwrite=true" in err, err
    # resuming an earlier tag of this directory while a newer one exists: the newer one is another run's future
    err = refused(1, ONE + ["train.steps=3", "train.ckpt_every=1", f"train.resume={out / 'checkpoints/step_00000002'}",
                            f"train.out_dir={out}"], tmp_path / "log_refused_back")[0]
    assert "(step_00000004) and this run starts from" in err and "(step 2)" in err, err
    assert {t: digest(out / "checkpoints" / t) for t in tags(out)} == before and latest(out) == "step_00000004"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]

    run(1, new + ["train.overwrite=true"], tmp_path / "log_new")
    aside = list(out.glob("replaced-*"))
    assert len(aside) == 1 and {t: digest(aside[0] / t) for t in before} == before  # moved, byte for byte
    assert (aside[0] / "latest").read_text().strip() == "step_00000004"
    assert [r["step"] for r in metrics(aside[0])] == [1, 2, 3, 4]
    assert tags(out) == ["step_00000002", "step_00000003"] and latest(out) == "step_00000003"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert export(out, tmp_path / "new.safetensors")["step"] == "3"
    run(1, ONE + ["train.steps=4", "train.ckpt_every=1", "train.keep_last=2", "train.seed=5", f"train.out_dir={out}"],
        tmp_path / "log_resume")
    assert "resumed from step_00000003 at step 3" in (tmp_path / "log_resume/rank0.log").read_text()


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Steps logged after the checkpoint a run resumes from (a crash before the next checkpoint) are trained and
    logged again: metrics.jsonl keeps one record per step, the earlier ones go to metrics.superseded.jsonl."""
    out = tmp_path / "run"
    run(1, ONE + ["train.steps=3", "train.ckpt_every=2", f"train.out_dir={out}"], tmp_path / "log_a")
    (out / "checkpoints/step_00000003/meta.json").unlink()  # what a kill during step 3's save leaves
    (out / "checkpoints/latest").write_text("step_00000002\n")
    run(1, ONE + ["train.steps=4", "train.ckpt_every=2", f"train.out_dir={out}"], tmp_path / "log_b")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    superseded = (out / "metrics.superseded.jsonl").read_text().splitlines()
    assert len(superseded) == 1 and '"step": 3' in superseded[0]


def test_a_second_job_in_a_held_run_directory_stops_naming_the_holder(tmp_path):
    """Two jobs, one run directory: the second stops at once on every rank with one line naming the first (host,
    pid, Slurm job id); the first trains on. Killed (SIGKILL: no clean-up of its own), it leaves the directory to
    the next job, which resumes its checkpoint."""
    out = tmp_path / "run"
    base = ONE + ["train.ckpt_every=2", f"train.out_dir={out}"]
    (tmp_path / "log_first").mkdir()
    first = spawn_local(1, [sys.executable, "-m", "promoe_ds.cli", "train", "--config", str(TINY), *base,
                            "train.steps=100000"], log_dir=tmp_path / "log_first",
                        env={"OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242"})[0]
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints/latest").is_file():
            assert time.time() < deadline and first.poll() is None, (tmp_path / "log_first/rank0.log").read_text()
            time.sleep(0.2)
        for err in refused(2, base + ["train.ep_size=2", "train.steps=100000"], tmp_path / "log_second"):
            assert (f"train.out_dir: '{out}' is in use by another run (host {socket.gethostname()}, pid {first.pid}, "
                    "Slurm job 4242, since ") in err, err
        assert first.poll() is None  # undisturbed
    finally:
        first.kill()
    first.wait()
    stopped = int(latest(out).split("_")[1])
    run(1, base + [f"train.steps={stopped + 1}"], tmp_path / "log_third")
    assert f"resumed from step_{stopped:08d}" in (tmp_path / "log_third/rank0.log").read_text()


def can_mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if r.returncode == 0:
        subprocess.run(["umount", str(where)], check=True)
    return r.returncode == 0


@pytest.mark.parametrize("where", ["deepspeed", "promoe"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, where):
    """A tmpfs with room for step 1's checkpoint, then shrunk to leave less than step 2's needs: its save fails in
    DeepSpeed's files (half of their size free) or in promoe-ds' own (their size plus half of dense.pt's). One
    error line with the file and the free space, exit 1; step 1 stays complete, byte for byte, and `latest`; with
    room again the run resumes from it."""
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root (the /dev/full test covers full-disk writes without it)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        base = ONE + ["train.ckpt_every=1", "train.keep_last=1", f"train.out_dir={out}"]
        run(1, base + ["train.steps=1"], tmp_path / "log_a")
        tag = out / "checkpoints/step_00000001"
        kept = digest(tag)
        deepspeed = sum(f.stat().st_size for f in tag.iterdir() if f.is_file())
        free = deepspeed // 2 if where == "deepspeed" else deepspeed + (tag / "promoe/dense.pt").stat().st_size // 2
        size_kib = (shutil.disk_usage(disk).used + free) // 1024
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(disk)], check=True)
        err = refused(1, base + ["train.steps=3"], tmp_path / "log_b", code=1)[0]
        file = out / "checkpoints/step_00000002" / ("" if where == "deepspeed" else "promoe/dense.pt")
        assert err.startswith(f"error: rank 0: cannot write checkpoint '{str(file).rstrip('/')}' ("), err
        assert f"MiB free on {out / 'checkpoints'}" in err, err
        assert ("step_00000002 not written, the previous checkpoint step_00000001 is complete and 'latest' names it"
                in err), err
        assert tags(out) == ["step_00000001"] and latest(out) == "step_00000001"
        assert digest(tag) == kept
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        run(1, base + ["train.steps=3"], tmp_path / "log_c")
        assert "resumed from step_00000001 at step 1" in (tmp_path / "log_c/rank0.log").read_text()
        assert latest(out) == "step_00000003" and [r["step"] for r in metrics(out)] == [1, 2, 3]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_write_that_fails_on_another_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1's ZeRO partition of step 2 goes to /dev/full (every write: ENOSPC, as on a full disk): both ranks
    stop with the same line naming rank 1, no hang, and step 1 stays complete and `latest`."""
    out = tmp_path / "run"
    base = ["train.global_batch=8", "train.log_every=1", "train.ckpt_every=1", f"train.out_dir={out}"]
    run(2, base + ["train.steps=1"], tmp_path / "log_a")
    kept = digest(out / "checkpoints/step_00000001")
    (out / "checkpoints/step_00000002").mkdir()
    os.symlink("/dev/full", out / "checkpoints/step_00000002/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    errors = refused(2, base + ["train.steps=2"], tmp_path / "log_b", code=1)
    assert errors[0] == errors[1], errors
    tag = out / "checkpoints/step_00000002"
    assert errors[0].startswith(f"error: rank 1: cannot write checkpoint '{tag}' ("), errors
    assert "the previous checkpoint step_00000001 is complete and 'latest' names it" in errors[0]
    assert tags(out) == ["step_00000001"] and latest(out) == "step_00000001"
    assert digest(out / "checkpoints/step_00000001") == kept


def test_an_export_that_races_retention_names_the_deleted_tag(tmp_path):
    """The export has picked the tag `latest` names when the retention of the run still training deletes it
    (keep_last=1): it says so, not "truncated or corrupt" or "incomplete"."""
    out = tmp_path / "run"
    base = ONE + ["train.ckpt_every=1", "train.keep_last=1", f"train.out_dir={out}"]
    run(1, base + ["train.steps=1"], tmp_path / "log_a")
    tag_dir = find_tag_dir(out)
    run(1, base + ["train.steps=2"], tmp_path / "log_b")
    with pytest.raises(ConfigError) as e:
        consolidate(tag_dir)
    assert str(e.value) == (f"checkpoint '{tag_dir}' was deleted while it was read (a run training into "
                            f"'{out / 'checkpoints'}' keeps its train.keep_last newest checkpoints): export again "
                            "(complete tags now: step_00000002)")


def test_the_layout_refusal_says_what_a_new_run_from_an_export_keeps():
    """A checkpoint without layout-independent optimizer state, on another layout; or another global batch."""
    meta = {"world_size": 2, "ep_size": 2, "zero_stage": 2, "config": {"train": {"global_batch": 8}}}
    with pytest.raises(ConfigError) as e:
        check_layout(meta, 1, 1, 2, 8, Path("runs/x/checkpoints/step_00000010"))
    assert ("start a new run from the file with train.init_from=FILE train.resume=none and a new train.out_dir (the "
            "file's weights, the EMA by default, become the new run's weights and its EMA starts from them; AdamW's "
            "state, the step count, the LR warm-up and the data position start anew)") in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_layout(meta, 2, 2, 2, 16, Path("runs/x/checkpoints/step_00000010"))
    assert "start a new run with train.init_from=FILE train.resume=none in a new train.out_dir" in str(e.value)
