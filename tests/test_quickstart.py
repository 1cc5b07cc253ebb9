"""The quickstart: its class-consistency check tells right labels from wrong ones, and the pipeline end to
end (toy data -> autoencoder trained on it -> shards -> 2-process EP training -> export -> samples ->
check) draws samples of the classes they were asked for well above chance."""
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_prep import toy
from promoe_ds.config import load_config
from promoe_ds.export import read_metadata
from promoe_ds.quickstart import CLASSES, CONFIG, IMAGE_SIZE, class_consistency
from promoe_ds.quickstart import main as quickstart


def _fresh_npz(path, labels, blur=0.0):
    """Toy pictures (another seed than the training ones), optionally blurred, with ``labels`` as the asked-for
    classes, in the sampler's ADM .npz format."""
    pics = [toy.toy_image(c, np.random.default_rng([7, c, i]), IMAGE_SIZE).crop((0, 0, IMAGE_SIZE, IMAGE_SIZE))
            for c in range(CLASSES) for i in range(10)]
    arr = np.stack([np.asarray(p.filter(ImageFilter.GaussianBlur(blur)) if blur else p) for p in pics])
    np.savez(path, arr_0=arr, arr_1=np.asarray(labels))
    return path


def test_class_consistency_tells_the_asked_class_from_a_wrong_one(tmp_path):
    toy.main(["--out", str(tmp_path / "toy"), "--per-class", "32", "--size", str(IMAGE_SIZE)])
    truth = np.repeat(np.arange(CLASSES), 10)
    right = class_consistency(tmp_path / "toy" / "train", _fresh_npz(tmp_path / "a.npz", truth))
    assert right["rate"] >= 0.9 and right["classifier_rate"] >= 0.9
    blurred = class_consistency(tmp_path / "toy" / "train", _fresh_npz(tmp_path / "b.npz", truth, blur=2.0))
    assert blurred["rate"] >= 0.8  # the small autoencoder's pictures are blurred
    wrong = class_consistency(tmp_path / "toy" / "train", _fresh_npz(tmp_path / "c.npz", (truth + 1) % CLASSES))
    assert wrong["rate"] <= 0.1


@pytest.mark.slow
def test_quickstart_draws_the_classes_it_is_asked_for(tmp_path, capsys):
    """The quickstart as `make quickstart` runs it (about 5 minutes on 2 cores)."""
    result = quickstart(tmp_path / "qs")
    out = capsys.readouterr().out
    for n in range(1, 8):
        assert f"[{n}/7]" in out
    steps = load_config(str(CONFIG), ["data.source=synthetic"]).train.steps
    assert "quickstart done" in out and re.search(rf"step +{steps} ", out)  # rank 0's training log, echoed
    grid = np.asarray(Image.open(result["grid"]))
    assert grid.shape == (10 * 66 + 2, 10 * 66 + 2, 3)  # 100 images of 64 px, 10 x 10
    meta = read_metadata(result["weights"])
    assert meta["step"] == str(steps) and meta["weights"] == "ema"
    assert meta["vae"] == str(tmp_path / "qs" / "vae")  # the tiny VAE trained on the toy pictures
    assert json.loads(meta["train_config"])["train"]["ep_size"] == 2
    assert all(np.isfinite(result["losses"])) and result["losses"][-1] < result["losses"][0]
    # conditioning works: the samples show the class they were asked for far above chance (10%); a model that
    # ignored its labels, or learned them shuffled, would score about 10% here, as it would for any other class
    assert result["class_rate"] >= 0.5, result["class_rate"]
    shifted = float((result["predicted"] == (result["asked"] + 1) % CLASSES).mean())
    assert shifted <= 0.2, shifted
