"""``bench/train_step.py --gpus``: the weak-scaling mode launches the real trainer (torchrun, gloo CPU processes)."""
import json
import subprocess
import sys

import pytest

from dist_utils import REPO

pytestmark = pytest.mark.slow


def bench(*args, timeout=240):
    r = subprocess.run([sys.executable, "bench/train_step.py", "--device", "cpu", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [line for line in r.stdout.splitlines() if line.startswith("| ") and "GPUs" not in line]


def test_weak_scaling_on_cpu(tmp_path):
    table = bench("--gpus", "1,2", "--ep", "2", "--batch", "4", "--steps", "6", "--out-dir", str(tmp_path),
                  "--json", str(tmp_path / "res.json"))
    rows = json.loads((tmp_path / "res.json").read_text())
    assert len(rows) == len(table) == 2 and not any("error" in r for r in rows), rows
    assert [(r["gpus"], r["ep_size"], r["global_batch"]) for r in rows] == [(1, 1, 4), (2, 2, 8)]
    assert all(r["img_per_sec_per_gpu"] > 0 and r["intervals"] == 5 for r in rows)  # warm-up window skipped
    assert rows[1]["img_per_sec"] == pytest.approx(2 * rows[1]["img_per_sec_per_gpu"])
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["img_per_sec_per_gpu"] / rows[0]["img_per_sec_per_gpu"])
    cells = [c.strip() for c in table[1].strip("|").split("|")]
    assert cells[:3] == ["2", "2", "8"] and cells[5] == f"{rows[1]['efficiency']:.1%}", table
    assert (tmp_path / "tiny_cpu_n2_ep2_b4" / "metrics.jsonl").is_file()


def test_failed_launch_is_a_row(tmp_path):
    table = bench("--gpus", "1", "--preset", "NoSuchModel", "--out-dir", str(tmp_path), "--steps", "2")
    assert len(table) == 1 and "failed: exit" in table[0] and "NoSuchModel" in table[0], table
