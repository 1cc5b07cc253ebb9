"""FID / sFID / IS / precision-recall and the FID Inception-v3, offline (no real weights here)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.spatial.distance import cdist

from promoe_ds import evaluate as ev
from promoe_ds.cli import main as cli

# The FID Inception-v3 state dict (pt_inception-2015-12-05-6726825d.pth, the torchvision Inception3 layout
# without AuxLogits and with 1008 classes): these top-level modules, 94 conv+BN units (5 tensors each) and
# the fc layer = 472 tensors (BatchNorm num_batches_tracked counters not counted: optional in the file).
EXPECTED_TOP_LEVEL = {
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc",
}
EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


class TinyExtractor(nn.Module):
    """A small random network with the FIDInceptionV3 interface: float [N, 3, H, W] in [0, 255] ->
    (pool [N, 8], spatial [N, 18], logits [N, 5])."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, images):
        h = torch.tanh(self.conv(images / 128 - 1))
        spatial = nn.functional.adaptive_avg_pool2d(h[:, :2], 3).flatten(1)
        pool = h.mean(dim=(2, 3))
        return pool, spatial, self.fc(pool)


def _images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _direct_features(images):
    with torch.no_grad():
        pool, spatial, logits = TinyExtractor()(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    return pool.numpy(), spatial.numpy(), logits.numpy()


# --- FID -------------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    stats = ev.compute_statistics(f)
    assert abs(ev.fid_from_stats(*stats, *stats)) < 1e-6


def test_fid_closed_form_for_diagonal_and_commuting_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d1, d2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # diagonal: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(d1) - sqrt(d2))^2
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert ev.fid_from_stats(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(closed, rel=1e-10)
    # same eigenvectors: FID is rotation invariant
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    got = ev.fid_from_stats(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(closed, rel=1e-9)


def test_fid_general_covariances_against_symmetric_form():
    """tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): computed here with symmetric eigendecompositions."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1))
    assert ev.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)


def test_fid_of_two_gaussians_from_features():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 1.0, 0.0, 0.0])
    d1, d2 = np.array([1.0, 0.5, 2.0, 1.0]), np.array([0.25, 0.5, 1.0, 4.0])
    f1 = mu1 + np.sqrt(d1) * rng.normal(size=(400_000, 4))
    f2 = mu2 + np.sqrt(d2) * rng.normal(size=(400_000, 4))
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)  # = 1.5 + 1.25 + ...
    got = ev.fid_from_stats(*ev.compute_statistics(f1), *ev.compute_statistics(f2))
    assert got == pytest.approx(closed, abs=0.02)


def test_fid_singular_covariances_and_dimension_mismatch():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(5, 10))  # fewer samples than dimensions: singular covariance
    assert np.isfinite(ev.fid_from_stats(*ev.compute_statistics(f), *ev.compute_statistics(f + 1)))
    with pytest.raises(ValueError, match="different dimensions"):
        ev.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- IS ---------------------------------------------------------------------------------------------

def test_inception_score_uniform_is_one():
    mean, std = ev.inception_score(np.zeros((100, 7)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes_is_number_of_classes():
    k, splits = 6, 10
    logits = 60.0 * np.tile(np.eye(k), (splits, 1))  # every split holds each class once, confidently
    mean, std = ev.inception_score(logits, splits=splits)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    # all samples confidently the same class: no diversity, IS = 1
    assert ev.inception_score(60.0 * np.tile(np.eye(k)[:1], (50, 1)))[0] == pytest.approx(1.0, rel=1e-6)
    # the score is computed per consecutive split: two single-class halves give 1 per split, not 2
    halves = 60.0 * np.repeat(np.eye(2), 20, axis=0)
    assert ev.inception_score(halves, splits=2)[0] == pytest.approx(1.0, rel=1e-6)
    assert ev.inception_score(halves, splits=1)[0] == pytest.approx(2.0, rel=1e-6)


# --- precision / recall -----------------------------------------------------------------------------

def test_precision_recall_identical_and_disjoint_sets():
    f = np.random.default_rng(4).normal(size=(300, 12)).astype(np.float32)
    assert ev.precision_recall(f, f.copy(), batch_size=64) == (1.0, 1.0)
    assert ev.precision_recall(f, f + 100.0, batch_size=64) == (0.0, 0.0)


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(250, 5))
    sam = rng.normal(size=(180, 5)) + 1.0  # shifted: a non-trivial case

    def brute(support, queries, k=3):
        d = cdist(support, support)
        radii = np.sort(d, axis=1)[:, k]  # k-th neighbour, index 0 is the point itself
        return np.mean((cdist(queries, support) <= radii[None]).any(axis=1))

    precision, recall = ev.precision_recall(ref, sam, batch_size=37)
    assert precision == pytest.approx(brute(ref, sam)) and recall == pytest.approx(brute(sam, ref))
    assert 0.2 < precision < 0.95 and 0.2 < recall < 0.95


# --- npz reading and the whole path ---------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streaming_reader(tmp_path, compressed):
    images = _images(23, 0)
    path = str(tmp_path / "s.npz")
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=np.arange(23))
    assert ev.npz_image_count(path) == 23
    batches = list(ev.iter_npz_images(path, 5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert np.array_equal(np.concatenate(batches), images)


def test_npz_reader_rejects_wrong_layout(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ev.npz_image_count(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "n.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        ev.npz_image_count(str(tmp_path / "n.npz"))


def test_npz_to_stats_to_fid_with_a_tiny_network(tmp_path):
    sam_imgs, ref_imgs = _images(60, 1), _images(80, 2)
    sam, ref, ref_stats = (str(tmp_path / n) for n in ("samples.npz", "ref.npz", "ref_stats.npz"))
    np.savez(sam, arr_0=sam_imgs)
    np.savez_compressed(ref, arr_0=ref_imgs)
    net = TinyExtractor()

    same = ev.evaluate(sam, sam, net, batch_size=7)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["num_samples"] == 60

    # the batched npz path equals the features of all images at once
    got = ev.evaluate(sam, ref, net, batch_size=7)
    (sp, ss, sl), (rp, rs, _) = _direct_features(sam_imgs), _direct_features(ref_imgs)
    def fid(a, b):
        return ev.fid_from_stats(*ev.compute_statistics(a), *ev.compute_statistics(b))

    assert got["fid"] == pytest.approx(fid(sp, rp), rel=1e-5)
    assert got["sfid"] == pytest.approx(fid(ss, rs), rel=1e-5)
    assert got["inception_score"] == pytest.approx(ev.inception_score(sl)[0], rel=1e-6)
    assert (got["precision"], got["recall"]) == pytest.approx(ev.precision_recall(rp, sp))
    assert got["fid"] > 1e-3 and got["ref_statistics"] == "computed from arr_0" and got["num_ref_images"] == 80

    # a reference batch holding only precomputed statistics (ADM layout): FID/sFID from them, no P/R
    (mu, sigma), (mu_s, sigma_s) = ev.compute_statistics(rp), ev.compute_statistics(rs)
    np.savez(ref_stats, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    only = ev.evaluate(sam, ref_stats, net, batch_size=16)
    assert only["fid"] == pytest.approx(got["fid"], rel=1e-9) and only["sfid"] == pytest.approx(got["sfid"], rel=1e-9)
    assert only["precision"] is None and only["recall"] is None and only["ref_statistics"] == "precomputed in the file"
    # precomputed statistics take precedence over the reference images (ADM: statistics of the full set)
    np.savez(ref_stats, arr_0=ref_imgs[:20], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    both = ev.evaluate(sam, ref_stats, net, batch_size=16)
    assert both["fid"] == pytest.approx(got["fid"], rel=1e-9) and both["num_ref_images"] == 20


def test_fewer_samples_than_feature_dimensions_get_a_note(tmp_path, capsys):
    """Their covariance is singular (scipy warns about it): the FID is only indicative, and eval says so."""
    sam = str(tmp_path / "samples.npz")
    np.savez(sam, arr_0=_images(12, 1))
    net = TinyExtractor()

    def wide(images):  # 16-d pool features: more than the 12 samples
        pool, spatial, logits = net(images)
        return torch.cat([pool, pool], 1), spatial, logits

    ev.evaluate(sam, sam, wide, batch_size=5)
    assert "note: 12 samples for 16-d features: their covariance is singular" in capsys.readouterr().err
    ev.evaluate(sam, sam, net, batch_size=5)
    assert "note:" not in capsys.readouterr().err


def test_main_eval_prints_the_json_summary(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "s.npz", arr_0=_images(30, 3))
    np.savez(tmp_path / "r.npz", arr_0=_images(30, 4))
    (tmp_path / "w.pth").touch()
    monkeypatch.setattr(ev, "load_inception", lambda path: TinyExtractor())
    out = ev.main_eval(str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), str(tmp_path / "w.pth"), batch_size=8,
                       device="cpu")
    printed = json.loads(capsys.readouterr().out)
    assert printed == out
    assert {"fid", "sfid", "inception_score", "precision", "recall", "num_samples"} <= set(out)


# --- input errors: one ``error:`` line, exit code 2, before any feature is computed -------------------

def eval_refused(capsys, d, *extra) -> str:
    """``promoe-ds eval`` on d/{s.npz, r.npz, w.pth} that must fail with one ``error:`` line (returned), exit 2."""
    assert cli(["eval", "--samples", str(d / "s.npz"), "--ref", str(d / "r.npz"), "--inception", str(d / "w.pth"),
                *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Valid eval inputs (the tiny network stands in for the Inception weights); computing features fails."""
    np.savez(tmp_path / "s.npz", arr_0=_images(12, 3))
    np.savez(tmp_path / "r.npz", arr_0=_images(12, 4))
    (tmp_path / "w.pth").touch()
    monkeypatch.setattr(ev, "load_inception", lambda path: TinyExtractor())

    def no_features(*args, **kwargs):
        raise AssertionError("features computed before every input was checked")

    monkeypatch.setattr(ev, "compute_features", no_features)
    return tmp_path


def _truncated(path):
    np.savez(path, arr_0=_images(12, 5))
    path.write_bytes(path.read_bytes()[:2000])


def _stats(d, s):
    return {"mu": np.zeros(d), "sigma": np.eye(d), "mu_s": np.zeros(s), "sigma_s": np.eye(s)}


BAD_INPUTS = {  # file -> how it is broken -> (write it, words of the error)
    "s.npz": {
        "missing": (lambda p: p.unlink(), "--samples"),
        "garbage": (lambda p: p.write_bytes(b"not an npz" * 50), "not a readable .npz"),
        "truncated": (_truncated, "not a readable .npz"),
        "no arr_0": (lambda p: np.savez(p, images=_images(12, 5)), "no 'arr_0' image array"),
        "float": (lambda p: np.savez(p, arr_0=_images(12, 5) / 255.0), "arr_0 must be uint8"),
        "too few": (lambda p: np.savez(p, arr_0=_images(9, 5)), "9 images, the metrics need at least 10"),
    },
    "r.npz": {
        "missing": (lambda p: p.unlink(), "--ref"),
        "directory": (lambda p: (p.unlink(), p.mkdir()), "--ref"),
        "truncated": (_truncated, "not a readable .npz"),
        "neither images nor statistics": (lambda p: np.savez(p, arr_1=np.arange(3)),
                                          "needs images (arr_0) or statistics"),
        "too few": (lambda p: np.savez(p, arr_0=_images(3, 5)), "3 images, precision/recall need at least 4"),
        "statistics of other features": (lambda p: np.savez(p, **_stats(4, 18)), "mu [4], sigma [4, 4]) than this "
                                                                                "network's 8-d pool and 18-d spatial"),
    },
    "w.pth": {"missing": (lambda p: p.unlink(), "--inception")},
}


@pytest.mark.parametrize("name,how", [(name, how) for name, cases in BAD_INPUTS.items() for how in cases])
def test_bad_inputs_are_one_error_line_before_features(inputs, capsys, name, how):
    damage, words = BAD_INPUTS[name][how]
    damage(inputs / name)
    err = eval_refused(capsys, inputs)
    assert words in err and str(inputs / name) in err, err


def test_good_statistics_pass_the_checks(inputs):
    np.savez(inputs / "r.npz", **_stats(8, 18))
    assert ev.check_inputs(str(inputs / "s.npz"), str(inputs / "r.npz"), TinyExtractor())["mu"].shape == (8,)


@pytest.mark.parametrize("arg,words", [("--device=cuda", "--device cuda: this machine has 0 CUDA GPU(s)"),
                                       ("--batch-size=0", "--batch-size must be >= 1")])
def test_bad_flag_values_are_one_error_line(inputs, capsys, monkeypatch, arg, words):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without CUDA
    assert words in eval_refused(capsys, inputs, arg)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other weights"])
def test_unusable_inception_weights_are_one_error_line(tmp_path, capsys, damage):
    np.savez(tmp_path / "s.npz", arr_0=_images(12, 3))
    np.savez(tmp_path / "r.npz", arr_0=_images(12, 4))
    torch.save({"fc.bias": torch.zeros(1008)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    if damage != "other weights":
        (tmp_path / "w.pth").write_bytes(b"not torch weights" * 50 if damage == "garbage" else data[:len(data) // 2])
    err = eval_refused(capsys, tmp_path)
    assert str(tmp_path / "w.pth") in err and ev.INCEPTION_FILE in err, err


# --- the FID Inception-v3 ---------------------------------------------------------------------------

def test_fid_inception_architecture_matches_the_weights_file_layout():
    model = ev.FIDInceptionV3()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k.split(".")[0] for k in sd} == EXPECTED_TOP_LEVEL
    assert len(sd) == 472
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    # torchvision's Inception3 has 27,161,264 parameters; minus AuxLogits (3,326,696), plus 8 classes (16,392)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


def test_fid_inception_forward_shapes():
    model = ev.inception_from_state_dict(ev.FIDInceptionV3().state_dict())
    pool, spatial, logits = model(torch.rand(1, 3, 32, 32) * 255)
    assert pool.shape == (1, 2048) and spatial.shape == (1, 17 * 17 * 7) and logits.shape == (1, 1008)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_weights_with_missing_or_wrong_keys_give_a_clear_error(tmp_path):
    full = {k: v for k, v in ev.FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    ev.inception_from_state_dict(full)  # the num_batches_tracked counters are optional
    broken = dict(full)
    del broken["Mixed_6d.branch1x1.bn.running_var"]
    broken["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    broken["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError) as e:
        ev.inception_from_state_dict(broken)
    msg = str(e.value)
    assert "1 missing keys: Mixed_6d.branch1x1.bn.running_var" in msg
    assert "1 unexpected keys: AuxLogits.fc.weight" in msg and "fc.weight (1000, 2048) != (1008, 2048)" in msg
    path = tmp_path / "not_inception.pth"
    torch.save({"fc.bias": torch.zeros(1008)}, path)
    with pytest.raises(ValueError, match=r"not the FID Inception-v3 .* 471 missing keys: Conv2d_1a_3x3"):
        ev.load_inception(str(path))


def test_tf1_bilinear_resize():
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    out = ev.resize_bilinear_tf1(ramp, 8)  # source x = j * 4 / 8, upper neighbour clamped at the border
    assert torch.equal(out[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert out.shape == (1, 1, 8, 8)
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(ev.resize_bilinear_tf1(x, 5), x)
