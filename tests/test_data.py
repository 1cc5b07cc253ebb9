"""Latent sources: synthetic determinism, and the WebDataset shard loader (epochs, resume, bad shards).

Fake shards store sample k as mean = +(k+1) in view 0 and -(k+1) in view 1 with logvar = -30, so a
returned latent z = +-(k+1) * scale identifies both the sample and the view.
"""
import io
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.encode import write_manifest, write_shard
from promoe_ds.config import ConfigError, DataConfig
from promoe_ds.data import _tar_members, build_latent_source

SHAPE = (4, 4, 4)
SCALE = 0.5
CLASSES = 5


def make_shards(root: Path, counts) -> list[list[int]]:
    """Write one shard per count; returns the sample ids in each shard."""
    root.mkdir(parents=True, exist_ok=True)
    ids, entries, k = [], [], 0
    for i, n in enumerate(counts):
        shard_ids = list(range(k, k + n))
        k += n
        samples = []
        for j in shard_ids:
            mean = np.full((2, *SHAPE), j + 1, np.float16)
            mean[1] *= -1
            samples.append({"__key__": f"{j:08d}", "mean.npy": mean,
                            "logvar.npy": np.full((2, *SHAPE), -30, np.float16),
                            "cls": j % CLASSES, "src": f"c/{j}.JPEG"})
        entries.append(write_shard(root / f"shard-{i:06d}.tar", samples))
        ids.append(shard_ids)
    write_manifest(root, entries, vae="fake", image_size=32, scale_factor=SCALE, latent_shape=SHAPE,
                   num_classes=CLASSES, skipped=[])
    return ids


def source(root, *, rank=0, world=1, workers=2, micro=3, seed=0, resampled=True, buffer=4, shape=SHAPE, kind="wds"):
    cfg = DataConfig(source=kind, path=str(root), num_workers=workers, shuffle_buffer=buffer, resampled=resampled)
    return build_latent_source(cfg, latent_shape=shape, num_classes=CLASSES, micro_batch=micro, rank=rank,
                               world_size=world, seed=seed)


def decode(z, y):
    """(sample id, view) per row; checks the scale factor, the noise level and the label."""
    value = z.flatten(1).mean(1) / SCALE
    assert torch.allclose(z.flatten(1), (value * SCALE)[:, None], atol=1e-3)
    ids = value.abs().round().long() - 1
    assert torch.allclose(value.abs(), (ids + 1).float(), atol=1e-2)
    assert torch.equal(y, ids % CLASSES)
    return list(zip(ids.tolist(), (value < 0).long().tolist()))


def epoch_samples(src, epoch=0):
    """(id, view) of every sample of one epoch of a micro_batch=1 source (each row comes from the
    worker batch pulled last, whose epoch is stats["epoch"])."""
    seen = []
    while src.stats["epoch"] <= epoch:
        got = decode(*src.next_batch())
        if src.stats["epoch"] == epoch:
            seen += got
    return seen


def test_synthetic_is_world_size_independent_and_resumable():
    kw = dict(shape=(4, 8, 8), kind="synthetic", root="")
    whole = source(micro=4, world=1, seed=3, **kw)
    halves = [source(micro=2, world=2, rank=r, seed=3, **kw) for r in range(2)]
    for _ in range(3):
        z, y = whole.next_batch()
        parts = [h.next_batch() for h in halves]
        assert z.dtype == torch.float32 and z.shape == (4, 4, 8, 8) and y.dtype == torch.int64
        assert torch.equal(z, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    state = whole.state_dict()
    expected = whole.next_batch()
    other = source(micro=4, world=1, seed=3, **kw)
    other.load_state_dict(state)
    got = other.next_batch()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(source(micro=4, world=1, seed=4, **kw).next_batch()[0],
                           source(micro=4, world=1, seed=3, **kw).next_batch()[0])


def test_synthetic_latents_carry_the_class():
    src = source(micro=256, shape=(4, 8, 8), kind="synthetic", root="")
    z, y = src.next_batch()
    means = torch.stack([z[y == c].mean(0) for c in range(CLASSES)]).flatten(1)
    corr = torch.corrcoef(torch.cat([means, z[y == 0][:8].flatten(1)]))[-8:, :CLASSES]
    assert (corr[:, 0] > 0.5).all() and (corr[:, 1:].abs() < corr[:, :1]).all()


def test_each_sample_once_per_epoch_with_2_ranks_x_2_workers(tmp_path):
    ids = make_shards(tmp_path, [5, 7, 6, 3, 8, 4, 6])
    every = sorted(j for shard in ids for j in shard)
    for epoch in (0, 1):
        ranks = [source(tmp_path, rank=r, world=2, workers=2, micro=1, resampled=False) for r in range(2)]
        seen = [epoch_samples(src, epoch) for src in ranks]
        assert sorted(j for rank in seen for j, _ in rank) == every
        assert not {j for j, _ in seen[0]} & {j for j, _ in seen[1]}
        assert {v for rank in seen for _, v in rank} == {0, 1}  # both views are used
        if epoch == 0:
            first = seen
    assert [j for j, _ in first[0]] != [j for j, _ in seen[0]]  # each epoch is reshuffled


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_gives_the_same_batches(tmp_path, resampled):
    make_shards(tmp_path, [5, 7, 6, 3, 8])
    kw = dict(rank=1, world=2, workers=2, micro=4, resampled=resampled)
    a = source(tmp_path, **kw)
    states, batches = [], []
    for _ in range(12):  # crosses an epoch boundary
        states.append(a.state_dict())
        batches.append(a.next_batch())
    assert a.stats["epoch"] >= 1
    positions = {(s["batch"] % 2, s["offset"] > 0) for s in states}  # resampled: whole batches only
    assert positions >= ({(0, False), (1, False)} if resampled else {(0, True), (1, True), (1, False)})
    for cut in range(1, 9):  # a restart at every position, in the middle of worker batches too
        b = source(tmp_path, **kw)
        b.load_state_dict(states[cut])
        assert b.state_dict() == states[cut]
        for za, ya in batches[cut:cut + 4]:
            zb, yb = b.next_batch()
            assert torch.equal(za, zb) and torch.equal(ya, yb)
    fresh = source(tmp_path, **kw)
    for za, ya in batches[:6]:
        zb, yb = fresh.next_batch()
        assert torch.equal(za, zb) and torch.equal(ya, yb)
    assert not torch.equal(batches[0][0], source(tmp_path, **{**kw, "seed": 1}).next_batch()[0])


def test_resume_with_other_layout_restarts_the_epoch(tmp_path, caplog):
    make_shards(tmp_path, [5, 7, 6])
    a = source(tmp_path, workers=2)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    b = source(tmp_path, workers=1)
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(state)
    assert "restarting epoch" in caplog.text
    assert b.state_dict()["batch"] == 0 and b.state_dict()["epoch"] == state["epoch"]


def test_bad_shards_are_skipped_and_counted(tmp_path, caplog):
    ids = make_shards(tmp_path, [5, 6, 7, 8, 4])
    (tmp_path / "shard-000001.tar").unlink()
    (tmp_path / "shard-000002.tar").write_bytes(b"this is not a tar file" * 100)
    data = (tmp_path / "shard-000003.tar").read_bytes()
    (tmp_path / "shard-000003.tar").write_bytes(data[:len(data) // 2])
    for workers in (2, 0):  # warnings of worker processes go to their stderr, not to caplog
        with caplog.at_level(logging.WARNING):
            src = source(tmp_path, workers=workers, micro=1, resampled=False)
            seen = [j for j, _ in epoch_samples(src)]
        assert len(seen) == len(set(seen))
        assert set(ids[0] + ids[4]) <= set(seen) <= set(ids[0] + ids[4] + ids[3])
        assert src.stats["bad_shards"] == 3  # missing at start + 2 read failures in epoch 0
    assert "shard-000002.tar" in caplog.text and "shard-000003.tar" in caplog.text


def test_clear_errors(tmp_path):
    """Input mistakes are ConfigErrors (one `error:` line from the CLI), naming data.path and the file."""
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere" / "manifest.json")):
        source(tmp_path / "nowhere")
    make_shards(tmp_path, [3, 4])
    with pytest.raises(ConfigError, match="latents in"):
        source(tmp_path, shape=(4, 8, 8))
    manifest = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(manifest[:40])
    with pytest.raises(ConfigError, match="manifest.json is not valid JSON"):
        source(tmp_path)
    (tmp_path / "manifest.json").write_text(manifest)
    for p in tmp_path.glob("*.tar"):
        p.write_bytes(b"garbage" * 600)
    with pytest.raises(ConfigError, match="read no sample"):
        source(tmp_path, workers=2).next_batch()
    for p in tmp_path.glob("*.tar"):
        p.unlink()
    with pytest.raises(ConfigError, match="none of the 2 shards"):
        source(tmp_path)


def test_samples_with_a_class_out_of_range_are_skipped(tmp_path, caplog):
    """A label outside [0, num_classes) (num_classes itself would silently be the null label) is a bad sample."""
    make_shards(tmp_path, [6])
    shard = tmp_path / "shard-000000.tar"
    members = list(_tar_members(shard))
    bad = {f"{k:08d}" for k in (1, 4)}
    # the same shard with two classes out of range: CLASSES and 57
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            data = m["data"]
            if m["fname"].endswith(".cls") and m["fname"].split(".")[0] in bad:
                data = str(CLASSES if m["fname"].startswith("00000001") else 57).encode()
            info = tarfile.TarInfo(m["fname"])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = source(tmp_path, workers=0, micro=1, buffer=1, resampled=False)
    with caplog.at_level(logging.WARNING):
        seen = epoch_samples(src)
    assert sorted(i for i, _ in seen) == [0, 2, 3, 5]
    assert src.stats["bad_samples"] == 2 and "is not in [0, 5)" in caplog.text


def test_a_checkpoint_of_the_other_source_kind_starts_from_the_beginning(tmp_path, caplog):
    """data.source changed between a checkpoint and its resume: a warning, then reading from the start."""
    make_shards(tmp_path, [3, 4])
    synthetic, shards = source(tmp_path, kind="synthetic"), source(tmp_path)
    first = shards.next_batch()
    synthetic.next_batch()
    with caplog.at_level(logging.WARNING):
        shards.load_state_dict(synthetic.state_dict())
        source(tmp_path, kind="synthetic").load_state_dict(shards.state_dict())
    assert caplog.text.count("data.source changed since the checkpoint") == 2
    again = shards.next_batch()
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_fast_tar_reader_matches_tarfile(tmp_path):
    make_shards(tmp_path, [6])
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    assert [(m["fname"], m["data"]) for m in _tar_members(shard)] == expected
    assert len(expected) == 6 * 4


def test_samples_with_a_nonfinite_latent_are_skipped_and_named_once(tmp_path, caplog):
    """A NaN in a stored mean, or a log-variance whose exponential overflows: bad samples, skipped every epoch and
    counted each time, warned of once with their shard and key."""
    make_shards(tmp_path, [6])
    shard = tmp_path / "shard-000000.tar"
    members = list(_tar_members(shard))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            data, key = m["data"], m["fname"].split(".")[0]
            if m["fname"].endswith(".npy") and (key, m["fname"][len(key) + 1:]) in {("00000001", "mean.npy"),
                                                                                   ("00000004", "logvar.npy")}:
                a = np.load(io.BytesIO(data))
                a[:, 0, 1, 2] = np.nan if key == "00000001" else 200.0  # exp(100) overflows float32
                buf = io.BytesIO()
                np.save(buf, a)
                data = buf.getvalue()
            info = tarfile.TarInfo(m["fname"])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = source(tmp_path, workers=0, micro=1, buffer=1, resampled=False)
    with caplog.at_level(logging.WARNING):
        seen = epoch_samples(src, 1)  # reads epochs 0 and 1
    assert sorted(i for i, _ in seen) == [0, 2, 3, 5]
    assert src.stats["bad_samples"] == 4  # 2 in each epoch
    warned = [r.getMessage() for r in caplog.records if "non-finite latent" in r.getMessage()]
    assert sorted(w.split()[2] for w in warned) == ["00000001", "00000004"], warned
    assert all(str(shard) in w for w in warned)


@pytest.mark.parametrize("buffer", [1, 4])
def test_resume_on_another_world_size_rereads_only_unread_shards(tmp_path, buffer):
    """2 ranks x 2 workers read part of epoch 0, then 3 ranks x 1 worker (another micro-batch) resume from their
    positions: the epoch is finished with the shards not read in full, dealt over the new readers. Without a
    shuffle buffer nothing is left out and only samples of partly read shards repeat; with one, repeats and
    omissions stay within the bounds the report line states."""
    counts = [5, 7, 6, 3, 8, 4, 6, 5, 7, 6]
    ids = make_shards(tmp_path, counts)
    every = sorted(j for shard in ids for j in shard)
    old = [source(tmp_path, rank=r, world=2, workers=2, micro=2, resampled=False, buffer=buffer) for r in range(2)]
    read = [j for _ in range(5) for src in old for j, _ in decode(*src.next_batch())]
    assert old[0].stats["epoch"] == 0 and len(read) == 20
    states = [src.state_dict() for src in old]
    new = [source(tmp_path, rank=r, world=3, workers=1, micro=1, resampled=False, buffer=buffer) for r in range(3)]
    reports = [src.load_state_dict({"ranks": states}) for src in new]
    assert reports[0] == reports[2] and reports[0].startswith("data: another reading layout (2 ranks x 2 workers")
    bounds = re.search(r"at most (\d+) samples of it repeat and at most (\d+) are left", reports[0])
    repeat, lost = int(bounds[1]), int(bounds[2])
    epochs = {0: [], 1: [], 2: []}  # what the new readers return in the rest of epoch 0, in epoch 1 (and 2)
    for src in new:
        while src.stats["epoch"] <= 1:
            got = decode(*src.next_batch())
            epochs[src.stats["epoch"]] += [j for j, _ in got]
    rest = epochs[0]
    missing = set(every) - set(read) - set(rest)
    repeated = [j for j in rest if j in set(read)]
    assert len(set(rest)) == len(rest)  # a shard is dealt to one new reader
    assert len(missing) <= lost and len(repeated) <= repeat, (missing, repeated, reports[0])
    if buffer == 1:
        assert lost == 0 and not missing
        partly = [shard for shard in ids if set(shard) & set(read) and not set(shard) <= set(read)]
        assert set(repeated) <= {j for shard in partly for j in shard}
        fully = {j for shard in ids if set(shard) <= set(read) for j in shard}
        assert fully and not fully & set(rest)  # shards read in full are not read again
    assert sorted(epochs[1]) == every  # the next epoch is a whole one, over the new readers
