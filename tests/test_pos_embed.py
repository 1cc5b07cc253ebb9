"""The position embedding's layout: DiT's for new models, the recorded (or, unrecorded, the rows-first) one for
files promoe-ds wrote before, so weights trained either way keep their outputs."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from promoe_ds import load_pretrained
from promoe_ds.cli import main as cli
from promoe_ds.config import ConfigError, load_config, model_config_from_dict
from promoe_ds.diffusion import build_objective
from promoe_ds.export import consolidate, load_into, read_metadata
from promoe_ds.models.dit import build_model, sincos_pos_embed

from dist_utils import metrics, run

OLD = Path(__file__).parent / "assets" / "old_layout"  # written before the layout was recorded (README.md there)
TAG = OLD / "checkpoints" / "step_00000004"
# the settings OLD's run was trained with (tests/assets/old_layout/README.md)
OLD_RUN = ["model.depth=2", "model.hidden_size=16", "model.num_heads=2", "train.ep_size=1", "train.zero_stage=0",
           "train.global_batch=4", "train.lr=0.01", "train.ema_decay=0.5", "train.log_every=1", "data.num_workers=0"]


def dit_reference(dim: int, grid: int) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed, written out from its definition: channels [0, dim/2) encode
    np.meshgrid(grid_w, grid_h)[0] (the column index), [dim/2, dim) the row index; each half is
    [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (dim/4))."""
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    rows, cols = np.divmod(np.arange(grid * grid), grid)  # token i*grid+j is row i, column j
    half = [np.concatenate([np.sin(np.outer(p, omega)), np.cos(np.outer(p, omega))], 1) for p in (cols, rows)]
    return np.concatenate(half, 1)


def test_new_models_use_dits_layout():
    want = dit_reference(32, 4)
    np.testing.assert_allclose(sincos_pos_embed(32, 4), want, rtol=0, atol=1e-12)
    old = sincos_pos_embed(32, 4, "rows_first")
    np.testing.assert_allclose(old, np.concatenate([want[:, 16:], want[:, :16]], 1), rtol=0, atol=1e-12)
    cfg = load_config(None, ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.input_size=8"]).model
    assert cfg.pos_embed == "dit"
    torch.testing.assert_close(build_model(cfg).pos_embed[0], torch.from_numpy(want).float(), rtol=0, atol=1e-7)


def test_old_export_loads_with_its_layout_and_gives_its_outputs(capsys):
    ref = torch.load(OLD / "outputs.pt")
    assert "pos_embed" not in json.loads(read_metadata(OLD / "ema.safetensors")["config"])
    for _ in range(2):
        model = load_pretrained(OLD / "ema.safetensors")
        assert model.cfg.pos_embed == "rows_first"
        with torch.no_grad():
            torch.testing.assert_close(model(ref["x"], ref["t"], ref["y"])[0], ref["out_export"], rtol=0, atol=0)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and "does not record its position-embedding layout" in notes[0], notes
    with torch.no_grad():  # DiT's layout would have changed the outputs
        model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(16, 4)))
        assert (model(ref["x"], ref["t"], ref["y"])[0] - ref["out_export"]).abs().max() > 0.05
    dit = build_model(dataclasses.replace(model.cfg, pos_embed="dit"))
    with pytest.raises(ConfigError, match="trained with model.pos_embed=rows_first, this model has dit"):
        load_into(dit, OLD / "ema.safetensors")


def test_old_checkpoint_exports_with_the_layout_recorded(tmp_path):
    ref = torch.load(OLD / "outputs.pt")
    out = tmp_path / "model.safetensors"
    assert cli(["export", "--checkpoint", str(OLD / "checkpoints"), "--weights", "model", "--out", str(out)]) == 0
    assert json.loads(read_metadata(out)["config"])["pos_embed"] == "rows_first"
    with torch.no_grad():
        got = load_pretrained(out)(ref["x"], ref["t"], ref["y"])[0]
    torch.testing.assert_close(got, ref["out_checkpoint_model"], rtol=0, atol=0)


def test_resuming_an_old_run_trains_on_with_its_layout(tmp_path):
    """A run written before the record resumes with the rows-first layout: its first resumed loss is that of
    the checkpoint's weights with that layout, and its new checkpoint records the layout."""
    run_dir = tmp_path / "run"
    shutil.copytree(OLD / "checkpoints", run_dir / "checkpoints")
    overrides = OLD_RUN + ["train.steps=5", "train.ckpt_every=5", f"train.out_dir={run_dir}"]
    run(1, overrides, tmp_path / "log")
    log = (tmp_path / "log" / "rank0.log").read_text()
    assert log.count("does not record its position-embedding layout") == 1, log
    meta = json.loads((run_dir / "checkpoints" / "step_00000005" / "meta.json").read_text())
    assert meta["config"]["model"]["pos_embed"] == "rows_first"

    from promoe_ds.data import build_latent_source
    from promoe_ds.train import step_draws

    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny_cpu.yaml", overrides)
    m = cfg.model
    shape = (m.in_channels, m.input_size, m.input_size)
    data = build_latent_source(cfg.data, latent_shape=shape, num_classes=m.num_classes, micro_batch=4, rank=0,
                               world_size=1, seed=cfg.train.seed)
    data.load_state_dict(torch.load(TAG / "promoe" / "rank00000.pt", weights_only=False)["data"])
    x0, y = data.next_batch()
    objective = build_objective(cfg.objective)
    draws = step_draws(objective, cfg, 4, shape, range(4))
    y = torch.where(draws.pop("drop"), torch.full_like(y, m.num_classes), y)
    state, old_meta = consolidate(TAG, "model")
    losses = {}
    for layout in ("rows_first", "dit"):
        model = build_model(model_config_from_dict({**old_meta["config"]["model"], "pos_embed": layout}))
        model.load_state_dict(state)
        out = objective.training_losses(lambda xt, tt, model=model: model(xt, tt, y)[0], x0, dict(draws))
        losses[layout] = out["loss"].item()
    logged = metrics(run_dir)[0]
    assert logged["step"] == 5
    assert logged["loss"] == pytest.approx(losses["rows_first"], rel=1e-5)
    assert logged["loss"] != pytest.approx(losses["dit"], rel=1e-3)


def test_fine_tuning_from_an_old_export_keeps_its_layout(tmp_path):
    out_dir = tmp_path / "ft"
    run(1, OLD_RUN + ["train.steps=1", "train.ckpt_every=1", "train.lr=0.0", f"train.out_dir={out_dir}",
                      f"train.init_from={OLD / 'ema.safetensors'}"], tmp_path / "log")
    meta = json.loads((out_dir / "checkpoints" / "step_00000001" / "meta.json").read_text())
    assert meta["config"]["model"]["pos_embed"] == "rows_first"
    assert json.loads((out_dir / "config.json").read_text())["model"]["pos_embed"] == "rows_first"
