"""data_prep: toy JPEGs, and VAE encoding into shards (contents, manifest, corrupt images, resume, ranks).

A tiny random AutoencoderKL (4 blocks = downsampling x8, 32px images -> 4x4x4 latents) stands in for
sd-vae-ft-ema; it is saved with save_pretrained and loaded by path, as offline users would.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL
from PIL import Image

from data_prep import toy
from data_prep.encode import center_crop_arr, parse_args
from data_prep.encode import main as encode
from promoe_ds.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.3
ARGS = ["--image-size", "32", "--shard-size", "4", "--batch-size", "3", "--workers", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Byte-identical shards need the same conv arithmetic in and out of process (subprocesses: OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    toy.main(["--out", str(root), "--classes", "3", "--per-class", "5", "--size", "40", "--seed", "1"])
    train = root / "train"
    (train / "n00000001" / "broken.JPEG").write_bytes(b"this is not a jpeg")
    jpeg = (train / "n00000002" / "n00000002_0.JPEG").read_bytes()
    (train / "n00000002" / "n00000002_9.JPEG").write_bytes(jpeg[:len(jpeg) // 2])  # truncated
    return train


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32, scaling_factor=SCALE)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(toy_train, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    encode(["--data", str(toy_train), "--out", str(out), "--vae", str(vae_dir), *ARGS])
    return out


def tar_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_toy_images_are_deterministic_jpegs(tmp_path):
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        toy.main(["--out", str(tmp_path / name), "--classes", "2", "--per-class", "3", "--size", "24",
                  "--seed", str(seed)])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert [str(f) for f in files][:2] == ["train/n00000000/n00000000_0.JPEG", "train/n00000000/n00000000_1.JPEG"]
    assert len(files) == 6 and all((tmp_path / "a" / f).read_bytes()[:2] == b"\xff\xd8" for f in files)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    assert min(Image.open(tmp_path / "a" / files[0]).size) == 24


def test_center_crop_keeps_the_middle():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 150:] = 255  # left half black, right half white
    crop = center_crop_arr(Image.fromarray(wide), 32)
    assert crop.shape == (32, 32, 3)
    assert crop[:, :12].max() < 30 and crop[:, 20:].min() > 225
    tall = np.zeros((300, 120, 3), np.uint8)
    tall[150:] = 255
    crop = center_crop_arr(Image.fromarray(tall), 32)
    assert crop.shape == (32, 32, 3) and crop[:12].max() < 30 and crop[20:].min() > 225


def test_manifest_counts_checksums_and_skipped_images(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert json.loads((shards / "classes.json").read_text()) == {"n00000000": 0, "n00000001": 1, "n00000002": 2}
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["scale_factor"] == pytest.approx(SCALE)
    assert manifest["num_classes"] == 3 and manifest["image_size"] == 32
    assert manifest["total_samples"] == 15
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]  # 17 images / 4
    assert manifest["skipped"]["count"] == 2
    assert {s["path"] for s in manifest["skipped"]["images"]} == {"n00000001/broken.JPEG", "n00000002/n00000002_9.JPEG"}
    for entry in manifest["shards"]:
        path = shards / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert len(list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))) == entry["samples"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 3, 4, 4, 0]  # broken = image 5, truncated = 16
    assert not list(shards.glob("*.tmp"))


def test_shard_samples_hold_both_views_of_the_right_image(shards, toy_train, vae_dir):
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 15
    for s in samples:
        mean, logvar = s["mean.npy"], s["logvar.npy"]
        assert mean.dtype == logvar.dtype == np.float16 and mean.shape == logvar.shape == (2, 4, 4, 4)
        src = s["src"].decode()
        wnid = src.split("/")[0]
        assert s["cls"] == int(wnid[1:])  # toy wnids are n<class index>
        crop = center_crop_arr(Image.open(toy_train / src).convert("RGB"), 32)
        x = torch.from_numpy(np.stack([crop, crop[:, ::-1]]).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        np.testing.assert_allclose(mean.astype(np.float32), post.mean.numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(logvar.astype(np.float32), post.logvar.numpy(), atol=2e-3, rtol=2e-3)
        assert not np.allclose(mean[0], mean[1], atol=1e-2)  # the flip is a different view
    assert sorted(int(s["__key__"]) for s in samples) == [i for i in range(17) if i not in (5, 16)]


def test_killed_run_resumes_to_identical_shards(shards, toy_train, vae_dir, tmp_path, capsys):
    """SIGKILL in the middle of shard 1 (after 6 samples), rerun: same bytes as an uninterrupted run."""
    out = tmp_path / "out"
    killer = ("import os, signal, sys, webdataset\n"
              "n, write = [0], webdataset.TarWriter.write\n"
              "def counted(self, obj):\n"
              "    n[0] += 1\n"
              "    if n[0] > 6: os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return write(self, obj)\n"
              "webdataset.TarWriter.write = counted\n"
              "from data_prep.encode import main\n"
              "main(sys.argv[1:])\n")
    cmd = [sys.executable, "-c", killer, "--data", str(toy_train), "--out", str(out), "--vae", str(vae_dir), *ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in sorted(out.glob("shard-*"))] == ["shard-000000.tar", "shard-000001.tar.tmp"]
    assert not (out / "manifest.json").exists()
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    encode(["--data", str(toy_train), "--out", str(out), "--vae", str(vae_dir), *ARGS])
    assert "4 shards written, 1 already complete" in capsys.readouterr().out
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first
    assert tar_bytes(out) == tar_bytes(shards)
    assert (out / "manifest.json").read_text() == (shards / "manifest.json").read_text()
    assert not list(out.glob("*.tmp"))


def test_shard_ranges_then_finalize(shards, toy_train, vae_dir, tmp_path, capsys):
    """Two Slurm-array-style tasks; the manifest appears once both are done."""
    out = tmp_path / "out"
    common = ["--data", str(toy_train), "--out", str(out), "--vae", str(vae_dir), *ARGS]
    encode([*common, "--shard-range", "3:"])
    assert "3 of 5 shards not done yet" in capsys.readouterr().out and not (out / "manifest.json").exists()
    with pytest.raises(SystemExit):
        encode(["--out", str(out), "--finalize-only"])
    encode([*common, "--shard-range", "0:3"])
    assert tar_bytes(out) == tar_bytes(shards)
    manifest = (out / "manifest.json").read_text()
    assert manifest == (shards / "manifest.json").read_text()
    (out / "manifest.json").unlink()
    encode(["--out", str(out), "--finalize-only"])
    assert (out / "manifest.json").read_text() == manifest


def test_two_processes_split_the_shards(shards, toy_train, vae_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "data_prep.encode",
           "--data", str(toy_train), "--out", str(out), "--vae", str(vae_dir), *ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[process 0/2] 8 images encoded" in proc.stdout and "[process 1/2] 7 images encoded" in proc.stdout
    assert tar_bytes(out) == tar_bytes(shards)
    assert (out / "manifest.json").read_text() == (shards / "manifest.json").read_text()


def test_unloadable_vae_is_one_clear_line(toy_train, tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        encode(["--data", str(toy_train), "--out", str(tmp_path), "--vae", str(tmp_path / "missing"), *ARGS])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load the VAE .* pass a local directory"):
        encode(["--data", str(toy_train), "--out", str(tmp_path), "--vae", str(tmp_path / "empty"), *ARGS])


def test_errors_exit_2_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.encode", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: --data {tmp_path / 'absent'} is not a "
                                                                 f"directory"], proc.stderr


@pytest.mark.parametrize("flag", ["--image-size", "--shard-size", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_non_positive_sizes_are_refused_when_parsing(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", str(tmp_path), "--out", str(tmp_path), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"python -m data_prep.encode: error: argument {flag}: must be a positive integer, got {value!r}"


def test_a_local_vae_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    """The manifest (and so exports and `promoe-ds sample`) names a local VAE by an absolute path: a relative one
    would not be found from another working directory."""
    (tmp_path / "vae").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_args(["--data", ".", "--out", "o", "--vae", "vae"]).vae == str((tmp_path / "vae").resolve())
    assert parse_args(["--data", ".", "--out", "o", "--vae", "org/hub-id"]).vae == "org/hub-id"
