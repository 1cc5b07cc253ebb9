"""Latent batches for the trainer: a synthetic source (no files) and a WebDataset shard source.

``build_latent_source(...)`` returns an object with ``next_batch() -> (latents, labels)``: float32
``[micro_batch, C, H, W]`` already multiplied by the VAE scale factor, and int64 ``[micro_batch]``.
Both sources are infinite, deterministic for a given seed, and resumable via ``state_dict()``.

Shard source (``data.source: wds``), over the shards of ``<data.path>/manifest.json`` written by
``python -m data_prep.encode``:

* Epochs. Epoch ``e`` gives every (rank, dataloader worker) pair, a *slot*, its own list of shards.
  ``resampled: false``: the shards are permuted with ``seed`` and ``e`` and dealt out to the
  ``world_size * num_workers`` slots, so each sample is read exactly once per epoch across all
  ranks. ``resampled: true``: each slot draws ``ceil(shards / slots)`` shards with replacement, a
  "virtual epoch" of about the same size. Each slot reads its shards in order through a shuffle
  buffer (seeded by seed, epoch, rank, worker), picks one of the two stored views per sample (the
  flip augmentation) and draws z = mean + exp(logvar / 2) * eps with a generator seeded per batch.
* Order. Every worker of a rank yields the same number of batches per epoch (padded with short or
  empty batches when its shards hold fewer samples; resampled: whole batches only, the tail of the
  random draw is dropped), so the DataLoader's round-robin order is fixed. Workers live across
  epochs. ``next_batch`` re-cuts that stream into ``micro_batch`` rows, so an epoch's tail and the
  next epoch's head may share a batch.
* Resume position (``state_dict``): ``{"epoch", "batch", "offset"}`` = the next sample to return is
  row ``offset`` of worker batch ``batch`` of epoch ``epoch`` of this rank's stream. Loading it
  rebuilds epoch ``epoch``, lets each worker skip its consumed batches (raw tar reading through the
  shuffle buffer, no decoding) and drops ``offset`` rows: the following batches are bit-identical to
  an uninterrupted run, provided world size, num_workers, micro_batch, seed, shuffle_buffer,
  resampled and the shard list are unchanged (checked via ``layout``). A resume on another world size,
  num_workers or micro_batch gets every old rank's position (``{"ranks": [...]}``, the trainer reads
  them all) and finishes the epoch in progress with the shards no old reader slot had returned in full,
  dealt over the new slots (``redeal``); per old slot (rank x worker) at most its partly read shard plus
  shuffle_buffer samples repeat and at most shuffle_buffer are left out, and ``load_state_dict``
  returns a line saying how many; later epochs are whole. Another seed, resampling or shard list: the
  source warns and restarts the saved epoch from its start. Resuming costs at most one epoch's share of
  reading for this rank.
* Bad data. A shard that is missing at start is left out and counted; one that fails while being
  read (missing, truncated, not a tar) is skipped for the rest of that read with a warning and
  counted in ``stats["bad_shards"]`` (again each epoch it is drawn). A sample that cannot be decoded,
  whose class is outside [0, num_classes), or whose latent is not finite (NaN / inf stored, or a log-variance
  whose exponential overflows; warned of once, naming the shard and the key) is skipped and counted in
  ``stats["bad_samples"]``. If an epoch of this rank yields no sample at all, a ``ConfigError`` names the
  data path instead of looping forever.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import random
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from webdataset.tariterators import group_by_keys

from promoe_ds.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "promoe-ds-latents-v1"


class LatentSource(Protocol):
    stats: dict

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, d: dict) -> None: ...


def stable_seed(*parts) -> int:
    """A 63-bit seed from ints and strings, the same on every machine and Python version."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_latent_source(data_cfg, *, latent_shape: tuple[int, int, int], num_classes: int,
                        micro_batch: int, rank: int, world_size: int, seed: int, grad_accum: int = 1) -> LatentSource:
    """The trainer's data: ``data_cfg`` is a ``promoe_ds.config.DataConfig``; ``grad_accum`` micro-batches a step."""
    if data_cfg.source == "synthetic":
        return SyntheticSource(tuple(latent_shape), num_classes, micro_batch, rank, world_size, seed, grad_accum)
    if data_cfg.source == "wds":
        return ShardSource(data_cfg, tuple(latent_shape), num_classes, micro_batch, rank, world_size, seed)
    raise ValueError(f"data.source: unknown source {data_cfg.source!r} (synthetic | wds)")


class SyntheticSource:
    """Random latents, no files: a smooth per-class pattern plus noise, so a model can learn it.

    Micro-batch ``m`` of step ``s`` on rank ``r`` is rows ``[(m*world + r)*micro_batch, ...+micro_batch)`` of
    step s's global batch, whose row i is drawn from a generator seeded with ``(seed, s, i)``: the data depend
    neither on the world size nor on the gradient accumulation, and a rank draws only its own rows. The
    position (``state_dict``) is the number of samples the world has read, so any layout resumes it exactly.
    """

    def __init__(self, latent_shape, num_classes, micro_batch, rank, world_size, seed, grad_accum=1):
        self.latent_shape, self.num_classes, self.seed = latent_shape, num_classes, seed
        self.micro, self.rank, self.world, self.grad_accum = micro_batch, rank, world_size, grad_accum
        g = torch.Generator().manual_seed(stable_seed(seed, "synthetic-classes"))
        coarse = torch.randn(num_classes, latent_shape[0], 4, 4, generator=g)
        self.patterns = F.interpolate(coarse, size=latent_shape[1:], mode="bilinear", align_corners=False)
        self.step = 0  # micro-batches read by this rank
        self.stats = {"samples": 0, "bad_shards": 0}

    def next_batch(self):
        step, m = divmod(self.step, self.grad_accum)
        first = (m * self.world + self.rank) * self.micro
        labels, noise = [], []
        for i in range(first, first + self.micro):
            g = torch.Generator().manual_seed(stable_seed(self.seed, step, i))
            labels.append(torch.randint(self.num_classes, (1,), generator=g))
            noise.append(torch.randn(1, *self.latent_shape, generator=g))
        labels, noise = torch.cat(labels), torch.cat(noise)
        self.step += 1
        self.stats["samples"] += len(labels)
        return self.patterns[labels] + 0.5 * noise, labels

    def state_dict(self):
        return {"step": self.step, "samples": self.step * self.micro * self.world}

    def load_state_dict(self, d) -> str:
        """From one rank's state or every rank's ({"ranks": [...]}, another layout: the same global position)."""
        d = d["ranks"][0] if "ranks" in d else d
        if "step" not in d:  # the checkpoint's run read shards (data.source changed)
            log.warning("data.source changed since the checkpoint: synthetic latents from their start")
        self.step = int(d["samples"]) // (self.micro * self.world) if "samples" in d else int(d.get("step", 0))
        return ""


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"data.path: {path} does not exist (write shards with `python -m data_prep.encode`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.path: {path} is not valid JSON ({e}); rewrite it with python -m data_prep.encode"
                          ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"data.path: {path} is not a {FORMAT} manifest")
    return manifest


def _tar_members(path: Path):
    """Regular files of an uncompressed ustar archive as webdataset file dicts.

    Python's tarfile parses only ~18k headers/s, too slow for 4 members per sample; the shards from
    data_prep.encode are plain ustar (no pax or GNU headers), which this reads at >100k members/s.
    """
    url = str(path)
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            header = f.read(512)
            if header[257:262] != b"ustar":
                if len(header) == 512 and not header.strip(b"\0"):
                    return  # end-of-archive block
                raise ValueError(f"no ustar header at byte {f.tell() - len(header)} (truncated or not a tar)")
            size = int(header[124:136].strip(b"\0 "), 8)
            data = f.read(size)
            if len(data) < size:
                raise EOFError("truncated tar member")
            f.seek(-size % 512, io.SEEK_CUR)
            kind = header[156:157]
            if kind in (b"0", b"\0"):
                name = header[:100].rstrip(b"\0").decode()
                if header[345]:  # ustar prefix of a long name
                    name = header[345:500].rstrip(b"\0").decode() + "/" + name
                yield {"fname": name, "data": data, "__url__": url}
            elif kind != b"5":  # directories are skipped
                raise ValueError(f"unsupported tar member type {kind!r}: shards must be plain ustar")


def epoch_shards(n: int, seed: int, resampled: bool, epoch: int, slot: int, slots: int) -> list[int]:
    """The shards (of ``n``) that reader slot ``slot`` of ``slots`` reads in ``epoch``, in order."""
    if resampled:
        rng = np.random.default_rng(stable_seed(seed, "resample", epoch, slot))
        return rng.integers(n, size=max(1, math.ceil(n / slots))).tolist()
    perm = np.random.default_rng(stable_seed(seed, "epoch", epoch)).permutation(n)
    return perm[slot::slots].tolist()


def redeal(states: list[dict], counts: list[int], shuffle_buffer: int) -> tuple[int, list[int], int, int]:
    """Where a resume on another layout starts reading, from every old rank's position (``state_dict``; same
    shards, seed and resampling): (epoch E, the shards of E still to read, at most how many samples of E repeat,
    at most how many are left out). A shard counts as read when its old reader slot had returned as many samples
    as its stream held up to that shard's end; those shards are left out of E, the others are read again in full.
    Through the shuffle buffer a slot has returned a mix of the first (returned + buffer) samples it read: per old
    slot, up to ``shuffle_buffer`` samples of shards counted as read may not have been returned (left out), and
    the samples it returned from the others (at most the partly read shard plus the buffer) repeat; an old rank
    already in a later epoch repeats what it read of that one."""
    layout = states[0]["layout"]
    world, workers, micro = layout["world_size"], max(1, layout["num_workers"]), layout["micro_batch"]
    epoch = min(int(st["epoch"]) for st in states)
    remaining, repeat, lost = [], 0, 0
    for worker in range(workers):
        for rank, st in enumerate(states):
            shards = epoch_shards(len(counts), layout["seed"], layout["resampled"], epoch, worker * world + rank,
                                  world * workers)
            total = sum(counts[i] for i in shards)
            batches, offset = int(st["batch"]), int(st["offset"])
            pulled = (batches - worker + workers - 1) // workers if batches > worker else 0  # i % workers == worker
            returned = min(total, pulled * micro + (offset if batches % workers == worker else 0))
            if int(st["epoch"]) > epoch:  # this rank finished E; what it returned of its epoch is read again
                repeat += batches * micro + offset if worker == 0 else 0
                continue
            read_through, done = 0, 0  # samples and shards (a prefix of the slot's list) read in full
            while done < len(shards) and read_through + counts[shards[done]] <= returned:
                read_through += counts[shards[done]]
                done += 1
            remaining += shards[done:]
            buffered = min(shuffle_buffer if shuffle_buffer > 1 else 0, read_through)
            lost += buffered
            repeat += returned - read_through + buffered
    return epoch, remaining, repeat, lost


class _Plan:
    """What every process needs to produce its epochs (picklable, shipped to DataLoader workers)."""

    def __init__(self, shards, counts, *, rank, world_size, workers, micro_batch, seed, resampled,
                 shuffle_buffer, latent_shape, scale, num_classes):
        self.shards, self.counts = shards, counts
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.micro_batch, self.seed, self.resampled = micro_batch, seed, resampled
        self.shuffle_buffer, self.latent_shape, self.scale = shuffle_buffer, latent_shape, scale
        self.num_classes = num_classes
        self.redealt: tuple[int, list[int]] | None = None  # (epoch, its shards) after a resume on another layout
        self._good_headers: set[bytes] = set()
        self._nonfinite_seen: set[tuple] = set()

    def slot_shards(self, epoch: int, worker: int) -> list[int]:
        slots = self.world_size * self.workers
        slot = worker * self.world_size + self.rank  # worker-major: every rank has a slot < world_size
        if self.redealt is not None and self.redealt[0] == epoch:
            return self.redealt[1][slot::slots]
        return epoch_shards(len(self.shards), self.seed, self.resampled, epoch, slot, slots)

    def batches_per_worker(self, epoch: int) -> int:
        counts = [sum(self.counts[i] for i in self.slot_shards(epoch, w)) for w in range(self.workers)]
        if self.resampled:  # whole batches only: the tail of a random draw is dropped
            return max(1, min(counts) // self.micro_batch)
        return math.ceil(max(counts) / self.micro_batch)

    def worker_batches(self, epoch: int, worker: int, skip: int):
        """Batches ``skip..`` of one worker's epoch: ``(z, labels, bad_shards, bad_samples)``."""
        errors = {"bad_shards": 0, "bad_samples": 0}
        samples = self._read(self.slot_shards(epoch, worker), errors)
        if self.shuffle_buffer > 1:
            rng = random.Random(stable_seed(self.seed, "shuffle", epoch, self.rank, worker))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        samples = iter(samples)
        for _ in itertools.islice(samples, skip * self.micro_batch):
            pass
        for j in range(skip, self.batches_per_worker(epoch)):
            chunk = list(itertools.islice(samples, self.micro_batch))
            z, labels = self._decode(chunk, stable_seed(self.seed, "noise", epoch, self.rank, worker, j), errors)
            yield z, labels, errors["bad_shards"], errors["bad_samples"]
            errors["bad_shards"] = errors["bad_samples"] = 0

    def _read(self, shard_ids, errors):
        for i in shard_ids:
            try:
                yield from group_by_keys(_tar_members(self.shards[i]))
            except Exception as e:  # missing, truncated or corrupt shard: skip the rest of it
                errors["bad_shards"] += 1
                log.warning("skipping shard %s: %s: %s", self.shards[i], type(e).__name__, e)

    def _npy(self, data: bytes) -> np.ndarray:
        shape = (2, *self.latent_shape)
        header = data[:len(data) - 2 * math.prod(shape)]
        if header not in self._good_headers:  # full check once per distinct header
            a = np.load(io.BytesIO(data))
            if a.dtype != np.float16 or a.shape != shape or not a.flags.c_contiguous:
                raise ValueError(f"expected float16 {shape}, got {a.dtype} {a.shape}")
            self._good_headers.add(header)
        return np.frombuffer(data, np.float16, offset=len(header)).reshape(shape)

    def _label(self, data: bytes) -> int:
        label = int(data)
        if not 0 <= label < self.num_classes:  # num_classes itself is the null label: never a sample's class
            raise ValueError(f"class {label} is not in [0, {self.num_classes})")
        return label

    def _decode(self, chunk, seed, errors):
        """Samples -> (z, labels): one random view each, z = (mean + exp(logvar / 2) * eps) * scale."""
        g = torch.Generator().manual_seed(seed)
        views = torch.randint(2, (len(chunk),), generator=g).tolist()
        stats = np.empty((len(chunk), 2, *self.latent_shape), np.float16)  # mean, logvar of the chosen view
        labels, decoded = [], []
        for s, v in zip(chunk, views):
            try:
                stats[len(labels), 0] = self._npy(s["mean.npy"])[v]
                stats[len(labels), 1] = self._npy(s["logvar.npy"])[v]
                labels.append(self._label(s["cls"]))
                decoded.append(s)
            except (KeyError, ValueError, OSError, EOFError) as e:
                errors["bad_samples"] += 1
                log.warning("skipping sample %s in %s: %s: %s", s.get("__key__"), s.get("__url__"), type(e).__name__, e)
        stats = torch.from_numpy(stats[:len(labels)]).float()
        eps = torch.randn(len(labels), *self.latent_shape, generator=g)
        std = stats[:, 1].mul_(0.5).exp_()
        z = torch.addcmul(stats[:, 0], std, eps, out=eps).mul_(self.scale)
        labels = torch.tensor(labels, dtype=torch.int64)
        finite = z.flatten(1).isfinite().all(1)
        if not finite.all():  # NaN / inf stored, or a log-variance whose exp overflows: the sample would make
            # every step it is drawn in non-finite and skipped
            for i in (~finite).nonzero().flatten().tolist():
                errors["bad_samples"] += 1
                self._nonfinite(decoded[i])
            z, labels = z[finite], labels[finite]
        return z, labels

    def _nonfinite(self, sample: dict) -> None:
        """Warns of a sample with a non-finite latent once per loader process (it comes back every epoch)."""
        name = (sample.get("__url__"), sample.get("__key__"))
        if name not in self._nonfinite_seen:
            self._nonfinite_seen.add(name)
            log.warning("skipping sample %s in %s: non-finite latent (NaN or inf in its stored mean or "
                        "log-variance); skipped and counted in data/bad_samples every time it is drawn", name[1],
                        name[0])


class _Stream(torch.utils.data.IterableDataset):
    """This rank's worker batches from batch ``start`` of ``epoch`` on, forever, in DataLoader order.

    The DataLoader asks its workers in turn, so batch i of an epoch comes from logical worker
    ``i % W``. Physical worker ``p`` plays logical worker ``(p + start) % W``, whose first
    ``ceil((start - logical) / W)`` batches were already consumed; every epoch has ``W * nb`` batches,
    so the rotation stays right in the following epochs.
    """

    def __init__(self, plan: _Plan, epoch: int, start: int):
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = self.plan.workers
        logical = ((info.id if info else 0) + self.start) % w
        epoch, skip = self.epoch, (self.start - logical + w - 1) // w
        while True:
            yield from self.plan.worker_batches(epoch, logical, skip)
            epoch, skip = epoch + 1, 0


class ShardSource:
    """Latents streamed from the WebDataset shards of a manifest (see the module docstring)."""

    def __init__(self, cfg, latent_shape, num_classes, micro_batch, rank, world_size, seed):
        root = Path(cfg.path)
        manifest = read_manifest(root)
        if tuple(manifest["latent_shape"]) != latent_shape:
            raise ConfigError(f"data.path: latents in {root} are {manifest['latent_shape']}, the model "
                             f"expects {list(latent_shape)} (model.in_channels / model.input_size)")
        if manifest["num_classes"] > num_classes:
            raise ConfigError(f"data.path: {root} has {manifest['num_classes']} classes, "
                              f"model.num_classes is {num_classes}")
        shards = [(root / s["name"], s["samples"]) for s in manifest["shards"]]
        missing = [str(p) for p, _ in shards if not p.is_file()]
        if missing:
            log.warning("%d of %d shards are missing and left out, e.g. %s", len(missing), len(shards), missing[0])
        shards = [(p, n) for p, n in shards if str(p) not in missing]
        if not shards:
            raise ConfigError(f"data.path: none of the {len(missing)} shards of {root / MANIFEST} exist")
        if not cfg.resampled and len(shards) < world_size:
            raise ConfigError(f"data.resampled=false needs at least one shard per rank: {len(shards)} shards "
                             f"for {world_size} ranks (use resampled=true or more, smaller shards)")
        workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(shards) < world_size * workers and rank == 0:
            log.warning("only %d shards for %d ranks x %d workers: some workers stay idle", len(shards), world_size,
                        workers)
        self.plan = _Plan([p for p, _ in shards], [n for _, n in shards], rank=rank, world_size=world_size,
                          workers=workers, micro_batch=micro_batch, seed=seed, resampled=cfg.resampled,
                          shuffle_buffer=cfg.shuffle_buffer, latent_shape=latent_shape,
                          scale=float(manifest["scale_factor"]), num_classes=num_classes)
        self.root, self.num_workers = root, cfg.num_workers
        names = "\n".join(p.name for p in self.plan.shards)
        self.layout = {"world_size": world_size, "num_workers": cfg.num_workers, "micro_batch": micro_batch,
                       "seed": seed, "resampled": cfg.resampled, "shuffle_buffer": cfg.shuffle_buffer,
                       "shards": hashlib.sha256(names.encode()).hexdigest()[:16]}
        self.stats = {"samples": 0, "bad_shards": len(missing), "bad_samples": 0, "epoch": 0}
        self._epoch, self._pulled, self._drop = 0, 0, 0  # position: epoch, worker batches pulled, rows to drop
        self._it = None
        self._carry = None  # (z, labels, offset): rest of the last pulled batch
        self._epoch_samples, self._check_empty = 0, True
        self._len_cache = (-1, 0)

    def next_batch(self):
        zs, ys, need = [], [], self.plan.micro_batch
        while need:
            if self._carry is None:
                self._carry = (*self._pull(), self._drop)
                self._drop = 0
            z, y, off = self._carry
            take = min(need, len(y) - off)
            zs.append(z[off:off + take])
            ys.append(y[off:off + take])
            need -= take
            self._carry = (z, y, off + take) if off + take < len(y) else None
        self.stats["samples"] += self.plan.micro_batch
        return (zs[0], ys[0]) if len(zs) == 1 else (torch.cat(zs), torch.cat(ys))

    def _pull(self):
        """The next worker batch of this rank's stream (workers live until the next load_state_dict)."""
        if self._it is None:
            # an epoch resumed in the middle, or with its unread shards dealt over new readers, is not checked
            self._check_empty = self._pulled == 0 and (self.plan.redealt or (None,))[0] != self._epoch
            loader = torch.utils.data.DataLoader(_Stream(self.plan, self._epoch, self._pulled), batch_size=None,
                                                 num_workers=self.num_workers,
                                                 prefetch_factor=4 if self.num_workers else None)
            self._it = iter(loader)
        if self._pulled == self._epoch_len():
            if self._check_empty and not self._epoch_samples:
                raise ConfigError(f"data.path: epoch {self._epoch} of rank {self.plan.rank} read no sample from "
                                   f"{self.root} ({self.stats['bad_shards']} shard failures; see the warnings)")
            self._epoch, self._pulled, self._epoch_samples, self._check_empty = self._epoch + 1, 0, 0, True
            self.stats["epoch"] = self._epoch
        z, y, bad_shards, bad_samples = next(self._it)
        self._pulled += 1
        self._epoch_samples += len(y)
        self.stats["bad_shards"] += bad_shards
        self.stats["bad_samples"] += bad_samples
        return z, y

    def _epoch_len(self) -> int:
        """Worker batches in the current epoch of this rank."""
        if self._len_cache[0] != self._epoch:
            self._len_cache = (self._epoch, self.plan.workers * self.plan.batches_per_worker(self._epoch))
        return self._len_cache[1]

    def state_dict(self):
        if self._carry is not None:
            epoch, batch, offset = self._epoch, self._pulled - 1, self._carry[2]
        else:
            epoch, batch, offset = self._epoch, self._pulled, self._drop
        if batch == self._epoch_len():
            epoch, batch, offset = epoch + 1, 0, 0
        return {"epoch": epoch, "batch": batch, "offset": offset, "layout": dict(self.layout)}

    def load_state_dict(self, d) -> str:
        """From this rank's state, or from every old rank's ({"ranks": [...]}, a resume on another layout: the
        epoch in progress continues with its shards not yet read, dealt over this layout's readers, see
        ``redeal``). Returns a line saying what a resume on another layout did ("" otherwise)."""
        self._it, self._carry, self._epoch_samples, self.plan.redealt = None, None, 0, None
        if "ranks" in d:
            states = d["ranks"]
            if self.plan.rank < len(states) and states[self.plan.rank].get("layout") == self.layout:
                d = states[self.plan.rank]  # the data layout is unchanged: this rank's own position
            elif "epoch" in states[0] and all(self._same_stream(st.get("layout")) for st in states):
                return self._redeal(states)
            else:
                d = states[min(self.plan.rank, len(states) - 1)]
        if "epoch" not in d:  # the checkpoint's run read synthetic latents (data.source changed)
            log.warning("data.source changed since the checkpoint: reading %s from its first epoch", self.root)
            self._epoch, self._pulled, self._drop = 0, 0, 0
        elif d.get("layout") == self.layout:
            self._epoch, self._pulled, self._drop = int(d["epoch"]), int(d["batch"]), int(d["offset"])
        else:
            log.warning("data layout changed since the checkpoint (%s -> %s): restarting epoch %d from its start",
                        d.get("layout"), self.layout, d["epoch"])
            self._epoch, self._pulled, self._drop = int(d["epoch"]), 0, 0
        self.stats["epoch"] = self._epoch
        return ""

    def _same_stream(self, layout: dict | None) -> bool:
        """Whether a checkpoint's data layout read the same epochs (shards, seed, resampling) as this one."""
        return layout is not None and all(layout.get(k) == self.layout[k] for k in ("shards", "seed", "resampled"))

    def _redeal(self, states: list[dict]) -> str:
        epoch, remaining, repeat, lost = redeal(states, self.plan.counts, self.plan.shuffle_buffer)
        self.plan.redealt = (epoch, remaining)
        self._epoch, self._pulled, self._drop = epoch, 0, 0
        self.stats["epoch"] = epoch
        old = states[0]["layout"]
        return (f"data: another reading layout ({old['world_size']} ranks x {max(1, old['num_workers'])} workers, "
                f"micro-batch {old['micro_batch']} -> {self.plan.world_size} x {self.plan.workers}, "
                f"{self.plan.micro_batch}): epoch {epoch} continues with the {len(remaining)} shard reads not yet "
                f"done, dealt over the new readers; at most {repeat} samples of it repeat and at most {lost} are "
                f"left out (data.shuffle_buffer={self.plan.shuffle_buffer})")
