"""``promoe-ds scaling-report`` on the logs of real CPU training runs (1 and 2 processes via torchrun),
plus the warm-up / restart handling on hand-made logs."""
from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from promoe_ds.parallel.launch import free_port
from promoe_ds.scaling import ScalingError, main_scaling_report, split_starts, summarize

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
PER_GPU = 4
STEPS, LOG_EVERY = 24, 4


def _torchrun(nproc: int, run_dir: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nnodes=1", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "promoe_ds.cli", "train", "--config", str(TINY),
           f"train.out_dir={run_dir}", f"train.global_batch={PER_GPU * nproc}", "train.ep_size=1",
           f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", f"train.ckpt_every={STEPS}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    """Two real runs of the tiny model, 1 and 2 processes, fixed per-process batch (weak scaling)."""
    root = tmp_path_factory.mktemp("scaling")
    dirs = []
    for n in (1, 2):
        d = root / f"p{n}"
        _torchrun(n, d)
        dirs.append(d)
    return dirs


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _png_ok(path: Path) -> tuple[int, int]:
    """Width and height of a PNG after checking its signature and every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks, size = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks, chunks
    return size


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scaling_report_on_real_runs(cpu_runs, tmp_path, capsys):
    out = tmp_path / "report" / "scal"
    rows = main_scaling_report([str(d) for d in reversed(cpu_runs)], str(out))
    printed = capsys.readouterr().out
    assert [r["gpus"] for r in rows] == [1, 2]  # sorted by size, the smallest first
    for row, d, n in zip(rows, cpu_runs, (1, 2)):
        recs = _records(d)
        assert [r["step"] for r in recs] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        kept = recs[1:]  # first logged interval = warm-up
        ips = sum(r["img_per_sec"] for r in kept) / len(kept)
        ips_gpu = sum(r["img_per_sec_per_gpu"] for r in kept) / len(kept)
        assert row["img_per_sec"] == pytest.approx(ips, rel=1e-9)
        assert row["img_per_sec_per_gpu"] == pytest.approx(ips_gpu, rel=1e-9)
        assert row["img_per_sec_per_gpu"] == pytest.approx(row["img_per_sec"] / n, rel=1e-6)
        assert row["global_batch"] == PER_GPU * n and row["per_gpu_batch"] == PER_GPU
        assert row["nodes"] == 1 and row["intervals"] == len(kept)
    base = rows[0]
    assert base["efficiency"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["img_per_sec_per_gpu"] / base["img_per_sec_per_gpu"])
    assert rows[1]["speedup"] == pytest.approx(rows[1]["img_per_sec"] / base["img_per_sec"])

    # CSV: the same numbers
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [int(t["gpus"]) for t in table] == [1, 2]
    for t, row in zip(table, rows):
        assert float(t["img_per_sec"]) == pytest.approx(row["img_per_sec"], rel=1e-5)
        assert float(t["img_per_sec_per_gpu"]) == pytest.approx(row["img_per_sec_per_gpu"], rel=1e-5)
        assert float(t["efficiency"]) == pytest.approx(row["efficiency"], rel=1e-5)
        assert int(t["nodes"]) == 1
    # markdown (written and printed): one row per run with the rounded numbers
    md = out.with_suffix(".md").read_text()
    for row in rows:
        line = next(x for x in md.splitlines() if x.startswith(f"| {row['run']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == str(row["gpus"])
        assert float(cells[5]) == pytest.approx(row["img_per_sec"], abs=0.051)
        assert float(cells[6]) == pytest.approx(row["img_per_sec_per_gpu"], abs=0.051)
        assert cells[8] == f"{row['efficiency']:.1%}"
        assert line in printed
    w, h = _png_ok(out.with_suffix(".png"))
    assert w > 300 and h > 200


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scaling_report_cli(cpu_runs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "promoe_ds.cli", "scaling-report", *map(str, cpu_runs),
                        "--out", str(tmp_path / "r"), "--skip", "2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "| p1 | 1 | 1 |" in r.stdout and "| p2 | 1 | 2 |" in r.stdout, r.stdout
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert int(rows[0]["intervals"]) == STEPS // LOG_EVERY - 2
    _png_ok(tmp_path / "r.png")


# ----------------------------------------------------------------------------- hand-made logs
def _write(d: Path, recs: list[dict], slurm_nodes: int | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if slurm_nodes:
        (d / "slurm_job.json").write_text(json.dumps({"job_id": "1", "nodes": slurm_nodes, "ntasks": 16}))
    return d


def _rec(step, ips, t, world=16, batch=512):
    return {"step": step, "loss": 1.0, "img_per_sec": ips, "img_per_sec_per_gpu": ips / world, "world_size": world,
            "global_batch": batch, "time": t}


def test_restart_segments_skip_each_warmup(tmp_path):
    # 10 steps per log at ~1 s/step; preempted after step 30, resumed from step 25 (step goes back),
    # then preempted after step 50 and resumed from a checkpoint at 50 (only a long time gap).
    recs = [_rec(10, 100.0, 10), _rec(20, 500, 20), _rec(30, 500, 30),
            _rec(30, 90.0, 400), _rec(40, 520, 410), _rec(50, 520, 420),
            _rec(60, 80.0, 900), _rec(70, 510, 910)]
    segs = split_starts(recs)
    assert [[r["step"] for r in s] for s in segs] == [[10, 20, 30], [30, 40, 50], [60, 70]]
    d = _write(tmp_path / "n2", recs, slurm_nodes=2)
    s = summarize(d, skip=1)
    assert s["img_per_sec"] == pytest.approx((500 + 500 + 520 + 520 + 510) / 5)
    assert s["nodes"] == 2 and s["gpus"] == 16 and s["intervals"] == 5
    assert s["mem_peak_gib"] is None  # no GPU memory logged (CPU runs)
    for r, gib in zip(recs, (61.5, 40, 40, 70.25, 40, 40, 39, 40)):  # GPU runs: the peak, warm-up included
        r["mem_peak_gib"] = gib
    assert summarize(_write(tmp_path / "gpu", recs), skip=1)["mem_peak_gib"] == 70.25


def test_efficiency_and_warmup_only(tmp_path, capsys):
    a = _write(tmp_path / "n1", [_rec(10, 50.0, 0, 8, 256), _rec(20, 200.0, 1, 8, 256)], slurm_nodes=1)
    b = _write(tmp_path / "n2", [_rec(10, 300.0, 0, 16, 512)])  # too short: warm-up only, kept with a warning
    rows = main_scaling_report([str(b), str(a)], str(tmp_path / "out.png"))
    assert [r["run"] for r in rows] == ["n1", "n2"]
    assert rows[1]["efficiency"] == pytest.approx((300 / 16) / (200 / 8))
    assert rows[1]["warmup_only"] and not rows[0]["warmup_only"]
    assert "warning: n2" in capsys.readouterr().out
    assert (tmp_path / "out.md").is_file() and (tmp_path / "out.csv").is_file()
    _png_ok(tmp_path / "out.png")


def test_errors_name_the_run(tmp_path):
    with pytest.raises(ScalingError, match="no metrics.jsonl"):
        summarize(tmp_path)
    d = _write(tmp_path / "mixed", [_rec(10, 1.0, 0, 8), _rec(20, 1.0, 1, 8), _rec(30, 1.0, 2, 16)])
    with pytest.raises(ScalingError, match="mixed.*world_size"):
        summarize(d)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.jsonl").write_text(json.dumps(_rec(10, 5.0, 0)) + "\n" + '{"step": 2')
    assert summarize(tmp_path / "cut")["intervals"] == 1  # a last line cut by a kill is ignored
    r = subprocess.run([sys.executable, "-m", "promoe_ds.cli", "scaling-report", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope" in r.stderr


def test_wallclock_cross_check(tmp_path, capsys):
    # 10 steps x 512 images per 10 s = 512 img/s by the wall clock, but 1024 logged (as when
    # gradient-accumulation micro-steps are counted as steps): kept, with a warning.
    d = _write(tmp_path / "n2", [_rec(10, 1024.0, 0), _rec(20, 1024.0, 10), _rec(30, 1024.0, 20)])
    s = summarize(d)
    assert s["img_per_sec"] == 1024.0 and s["wallclock_img_per_sec"] == pytest.approx(512.0)
    main_scaling_report([str(d)], str(tmp_path / "r"))
    out = capsys.readouterr().out
    assert "warning: n2: logged 1024.0 img/s but steps x global batch / wall clock gives 512.0" in out
    ok = _write(tmp_path / "ok", [_rec(10, 512.0, 0), _rec(20, 512.0, 10), _rec(30, 512.0, 20)])
    main_scaling_report([str(ok)], str(tmp_path / "r2"))
    assert "warning" not in capsys.readouterr().out
