"""The quickstart pipeline end to end (toy data -> VAE -> shards -> 2-process EP training -> export
-> samples), shortened: 20 training steps, 8 toy images per class, 5 sampling steps."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from promoe_ds.export import read_metadata
from promoe_ds.quickstart import main as quickstart

pytestmark = pytest.mark.slow


def test_quickstart_end_to_end(tmp_path, capsys):
    result = quickstart(tmp_path / "qs", steps=20, per_class=8, sample_steps=5)
    out = capsys.readouterr().out
    for n in range(1, 7):
        assert f"[{n}/6]" in out
    assert "quickstart done" in out and re.search(r"step +20 ", out)  # rank 0's training log, echoed
    grid = np.asarray(Image.open(result["grid"]))
    assert grid.shape == (10 * 66 + 2, 10 * 66 + 2, 3)  # 100 images of 64 px, 10 x 10
    meta = read_metadata(result["weights"])
    assert meta["step"] == "20" and meta["weights"] == "ema"
    assert meta["vae"] == str(tmp_path / "qs" / "vae") and float(meta["scale_factor"]) > 1  # calibrated tiny VAE
    assert json.loads(meta["train_config"])["train"]["ep_size"] == 2
    assert len(result["losses"]) == 1 and np.isfinite(result["losses"][0])
