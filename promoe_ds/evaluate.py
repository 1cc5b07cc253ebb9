"""FID, sFID, Inception Score, precision and recall following the ADM evaluation protocol, in PyTorch.

The protocol (Dhariwal & Nichol 2021, ``guided-diffusion/evaluations``) used by DiT and the paper:

- Features: the 2015-12-05 TensorFlow Inception-v3 ("FID Inception") on images resized to 299x299 with
  TF1 bilinear resizing (source coordinate = dst * in/out) and scaled (x - 128) / 128, as inside the TF
  graph. pool_3 (2048-d) gives FID and precision/recall; the first 7 channels of ``mixed_6/conv``
  (= ``Mixed_6d.branch1x1`` after its ReLU, 17x17, flattened HWC as in TF: 2023-d) give sFID; the
  1008-way softmax of ``pool_3 @ W`` (no bias, as ADM's ``softmax/logits/MatMul``) gives IS.
- FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Heusel et al. 2017, Eq. 6).
- IS = exp(E_x KL(p(y|x) || p(y))) per split, averaged over 10 splits (Salimans et al. 2016; ADM's
  5000-image splits of 50K samples).
- Precision / recall: k = 3 nearest-neighbour balls around each reference (sample) feature; precision is
  the fraction of samples inside some reference ball, recall the fraction of references inside some
  sample ball (Kynkaanniemi et al. 2019, Eq. 1-3).

Inputs are ADM-format ``.npz`` files: ``arr_0`` uint8 [N, H, W, 3]. A reference batch may carry
precomputed ``mu, sigma, mu_s, sigma_s`` (ADM's VIRTUAL_imagenet256_labeled.npz does); those are used
for FID/sFID, and its ``arr_0`` images (if any) for precision/recall. Any feature extractor with the same
interface as ``FIDInceptionV3`` can be passed to ``evaluate``: float [N, 3, H, W] in [0, 255] ->
(pool [N, F], spatial [N, S], logits [N, K]). Both files are checked before any feature is computed
(``check_inputs``): one that cannot give every metric is a ConfigError.
"""
from __future__ import annotations

import json
import math
import os
import sys
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from tqdm.auto import tqdm

from promoe_ds.config import ConfigError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IS_SPLITS = 10  # Inception Score: mean over 10 splits (ADM: 5000-image splits of 50K samples)
NN_K = 3  # precision / recall: balls to the k-th nearest neighbour


# ---------------------------------------------------------------------------------------------------
# The FID Inception-v3 (torchvision Inception3 layout with the TF graph's pooling quirks, 1008 classes)
# ---------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TF's 3x3 average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35: Mixed_5b/c/d
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):  # 35x35 -> 17x17: Mixed_6a
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # 17x17: Mixed_6b/c/d/e
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8: Mixed_7a
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8: Mixed_7b (average pool), Mixed_7c (max pool: a quirk of the TF graph)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TF1 ``ResizeBilinear(align_corners=False)``: output pixel j samples the input at
    j * in / out (no half-pixel offset), the upper neighbour clamped to the border."""
    def axis(n_in):
        pos = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)
        lo = pos.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (pos - lo).to(x.dtype)

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[2]), axis(x.shape[3])
    rows = torch.lerp(x[:, :, y0], x[:, :, y1], wy[:, None])
    return torch.lerp(rows[..., x0], rows[..., x1], wx)


class FIDInceptionV3(nn.Module):
    """Images float [N, 3, H, W] in [0, 255] -> (pool_3 [N, 2048], mixed_6/conv[..., :7] [N, 2023],
    logits [N, 1008])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = (resize_bilinear_tf1(images, 299) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)  # TF's NHWC order
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return pool, spatial, pool @ self.fc.weight.T


def inception_from_state_dict(state_dict: dict, source: str = "state dict") -> FIDInceptionV3:
    """Build the network and load ``state_dict`` with strict key and shape checks (BatchNorm's
    ``num_batches_tracked`` counters are optional: they do not affect evaluation)."""
    model = FIDInceptionV3()
    own = model.state_dict()

    def skip(k):
        return k.endswith("num_batches_tracked")

    missing = sorted(k for k in own if not skip(k) and k not in state_dict)
    unexpected = sorted(k for k in state_dict if not skip(k) and k not in own)
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state_dict and not skip(k) and state_dict[k].shape != own[k].shape]
    problems = [f"{len(v)} {name}: {', '.join(v[:8])}{', ...' if len(v) > 8 else ''}"
                for name, v in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                if v]
    if problems:
        raise ConfigError(f"{source} is not the FID Inception-v3 ({INCEPTION_FILE}); " + "; ".join(problems))
    model.load_state_dict({**own, **state_dict})
    return model.eval().requires_grad_(False)


def load_inception(path: str) -> FIDInceptionV3:
    from promoe_ds.checkpoint import load_tensors

    state_dict = load_tensors(path, f"--inception: pass the FID Inception-v3 weights {INCEPTION_FILE} "
                                    f"(docs/evaluate.md)")
    if not isinstance(state_dict, dict):
        raise ConfigError(f"{path}: expected a state dict of the FID Inception-v3 ({INCEPTION_FILE})")
    return inception_from_state_dict(state_dict, source=path)


# ---------------------------------------------------------------------------------------------------
# Reading ADM-format .npz batches
# ---------------------------------------------------------------------------------------------------

@contextmanager
def _open_npz(path: str):
    """The .npz at ``path`` as a zip file; ConfigError if it is not a readable one (missing, truncated, another
    format), also when reading its members fails."""
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ConfigError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); write it with numpy.savez "
                          f"(arr_0: the images), as promoe-ds sample does") from None


@contextmanager
def _open_images(path: str):
    """(shape, stream at the first byte of data) of ``arr_0`` in an .npz, checked to be uint8 [N, H, W, 3]."""
    with _open_npz(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise ConfigError(f"{path}: no 'arr_0' image array (members: {', '.join(sorted(zf.namelist()))})")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ConfigError(f"{path}: unsupported .npy format version {version} for arr_0")
            shape, fortran, dtype = read(f)
            if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
                raise ConfigError(f"{path}: arr_0 must be uint8 [N, H, W, 3] in C order (pixel values 0..255), "
                                  f"got {dtype} {shape}")
            yield shape, f


def npz_image_count(path: str) -> int:
    with _open_images(path) as (shape, _):
        return shape[0]


def iter_npz_images(path: str, batch_size: int):
    """uint8 [n, H, W, 3] batches of ``arr_0``, streamed: a 50K x 256^2 batch (10 GB) is never loaded whole."""
    with _open_images(path) as (shape, f):
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ConfigError(f"{path}: arr_0 is truncated after image {start + len(buf) // row}")
            yield np.frombuffer(bytearray(buf), dtype=np.uint8).reshape(n, *shape[1:])


def npz_has_images(path: str) -> bool:
    with _open_npz(path) as zf:
        return "arr_0.npy" in zf.namelist()


def read_ref_stats(path: str) -> dict[str, np.ndarray] | None:
    """The precomputed ``mu, sigma, mu_s, sigma_s`` of a reference batch; None unless it holds all four."""
    with _open_npz(path) as zf:
        if not {f"{k}.npy" for k in STATS_KEYS} <= set(zf.namelist()):
            return None
        return {k: np.lib.format.read_array(zf.open(f"{k}.npy")) for k in STATS_KEYS}


# ---------------------------------------------------------------------------------------------------
# Features and metrics
# ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def compute_features(extractor, path: str, batch_size: int = 64, device="cpu") -> dict[str, np.ndarray]:
    """Run ``extractor`` over the images of an .npz: {"pool", "spatial", "logits"} float32 arrays [N, *]."""
    n = npz_image_count(path)
    out = {"pool": [], "spatial": [], "logits": []}
    for batch in tqdm(iter_npz_images(path, batch_size), total=math.ceil(n / batch_size), desc=f"features {path}"):
        images = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
        for key, feats in zip(out, extractor(images)):
            out[key].append(feats.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    return features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False)


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians.

    As the reference implementations (TTUR, ADM): if the product is nearly singular (non-finite square
    root) eps is added to both diagonals; a complex square root is accepted only with a negligible
    imaginary diagonal (numerical noise), and its real part is used."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the matrix square root has a large imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) in each of ``splits`` consecutive parts: (mean, std) over the parts."""
    if len(logits) < splits:
        raise ValueError(f"inception score needs at least {splits} samples, got {len(logits)}")
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        scores.append(torch.exp((part.exp() * (part - log_marginal)).sum(1).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [n, m] = |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_(min=0)


def manifold_radii(feats: torch.Tensor, k: int = NN_K, batch_size: int = 2048) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour, the point itself not counted."""
    return torch.cat([_sq_dists(feats[i:i + batch_size], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), batch_size)])


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` inside at least one k-NN ball of ``support``."""
    inside = [(_sq_dists(queries[i:i + batch_size], support) <= radii).any(1)
              for i in range(0, len(queries), batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = NN_K, batch_size: int = 2048,
                     device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of pool features, distances in batches."""
    ref_t, sam_t = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (ref, samples))
    precision = _coverage(sam_t, ref_t, manifold_radii(ref_t, k, batch_size), batch_size)
    recall = _coverage(ref_t, sam_t, manifold_radii(sam_t, k, batch_size), batch_size)
    return precision, recall


@torch.inference_mode()
def check_inputs(samples: str, ref: str, extractor, device="cpu") -> dict[str, np.ndarray] | None:
    """Check, before any feature is computed, that the two .npz files can give every metric (ConfigError
    if not); returns the reference's precomputed statistics (None: to be computed from its images)."""
    with _open_images(samples) as (shape, _):
        n, h, w = shape[:3]
    need = max(IS_SPLITS, NN_K + 1)
    if n < need:
        raise ConfigError(f"--samples {samples}: {n} images, the metrics need at least {need} (Inception Score: "
                          f"{IS_SPLITS} splits); sample more (the paper: 50000)")
    stats = read_ref_stats(ref)
    if npz_has_images(ref):
        if (m := npz_image_count(ref)) < NN_K + 1:
            raise ConfigError(f"--ref {ref}: {m} images, precision/recall need at least {NN_K + 1}")
    elif stats is None:
        raise ConfigError(f"--ref {ref}: a reference batch needs images (arr_0) or statistics "
                          f"({', '.join(STATS_KEYS)}), e.g. VIRTUAL_imagenet256_labeled.npz (docs/evaluate.md)")
    if stats is not None:  # their dimensions against this extractor's features of one blank image
        pool, spatial, _ = extractor(torch.zeros(1, 3, h, w, device=device))
        d, s = pool.shape[1], spatial.shape[1]
        want = {"mu": (d,), "sigma": (d, d), "mu_s": (s,), "sigma_s": (s, s)}
        wrong = [f"{k} {list(stats[k].shape)}" for k in STATS_KEYS if stats[k].shape != want[k]]
        if wrong:
            raise ConfigError(f"--ref {ref}: statistics of other features ({', '.join(wrong)}) than this network's "
                              f"{d}-d pool and {s}-d spatial features; use the reference batch of the FID "
                              f"Inception-v3 (docs/evaluate.md)")
    return stats


def evaluate(samples: str, ref: str, extractor, batch_size: int = 64, device="cpu") -> dict:
    """All metrics of the sample batch against the reference batch (both ADM-format .npz paths)."""
    ref_stats = check_inputs(samples, ref, extractor, device)
    ref_feats = compute_features(extractor, ref, batch_size, device) if npz_has_images(ref) else None
    if ref_stats is None:
        (mu, sigma), (mu_s, sigma_s) = compute_statistics(ref_feats["pool"]), compute_statistics(ref_feats["spatial"])
        ref_stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        source = "computed from arr_0"
    else:
        source = "precomputed in the file"
    feats = compute_features(extractor, samples, batch_size, device)
    is_mean, is_std = inception_score(feats["logits"])
    precision, recall = (precision_recall(ref_feats["pool"], feats["pool"], device=device)
                         if ref_feats is not None else (None, None))
    n, d = feats["pool"].shape
    if n <= d:
        print(f"note: {n} samples for {d}-d features: their covariance is singular (scipy may warn), so FID and sFID "
              f"are only indicative (the ADM protocol: 50000 samples)", file=sys.stderr, flush=True)
    return {
        "samples": samples, "ref": ref, "num_samples": len(feats["pool"]),
        "num_ref_images": 0 if ref_feats is None else len(ref_feats["pool"]), "ref_statistics": source,
        "inception_score": is_mean, "inception_score_std": is_std,
        "fid": fid_from_stats(*compute_statistics(feats["pool"]), ref_stats["mu"], ref_stats["sigma"]),
        "sfid": fid_from_stats(*compute_statistics(feats["spatial"]), ref_stats["mu_s"], ref_stats["sigma_s"]),
        "precision": precision, "recall": recall,
    }


@contextmanager
def _no_tf32():
    """Evaluate convolutions and matmuls in full fp32 on GPUs (TF32 would shift the features)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main_eval(samples: str, ref: str, inception: str, batch_size: int = 64, device: str = "auto") -> dict:
    """``promoe-ds eval``: check the inputs, load the FID Inception weights, evaluate, print and return the
    JSON summary."""
    from promoe_ds.sample import resolve_device

    for flag, path in (("--samples", samples), ("--ref", ref), ("--inception", inception)):
        if not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"{flag} {path!r}: no such readable file (docs/evaluate.md says which files eval needs)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    extractor = load_inception(inception).to(device)
    with _no_tf32():
        summary = evaluate(samples, ref, extractor, batch_size=batch_size, device=device)
    summary["inception_weights"] = inception
    print(json.dumps(summary, indent=2))
    return summary
