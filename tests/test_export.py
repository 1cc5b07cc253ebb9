"""Export (checkpoint -> one safetensors file), loading, and fine-tuning from an export."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from promoe_ds import load_pretrained
from promoe_ds.cli import main as cli
from promoe_ds.config import ConfigError, load_config
from promoe_ds.diffusion import build_objective
from promoe_ds.export import load_into
from promoe_ds.models.dit import build_model
from promoe_ds.models.moe import routed_expert_layer

from dist_utils import REPO, TINY, metrics, run, spawn_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A 2-process ep_size=2 ZeRO-2 job (tests/live_gather.py): its checkpoint and its live state."""
    out = tmp_path_factory.mktemp("live")
    procs = spawn_local(2, [sys.executable, str(REPO / "tests" / "live_gather.py"), str(out)], log_dir=out,
                        env={"OMP_NUM_THREADS": "1"})
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (out / "rank0.log").read_text()[-3000:] + (out / "rank1.log").read_text()[-3000:]
    return out, torch.load(out / "live.pt")


def test_export_equals_live_gathered_state_and_output(live, tmp_path):
    run_dir, ref = live
    for weights in ("model", "ema"):
        out = tmp_path / f"{weights}.safetensors"
        assert cli(["export", "--checkpoint", str(run_dir), "--weights", weights, "--out", str(out)]) == 0
        state, want = load_file(out), ref["live"][weights]
        assert state.keys() == want.keys()
        for name in want:
            assert torch.equal(state[name], want[name]), name  # bit for bit
    routed = "blocks.1.mlp.routed_experts.w1"
    assert state[routed].shape[0] == 4  # both EP ranks' experts
    assert not torch.equal(load_file(tmp_path / "model.safetensors")[routed], state[routed])  # EMA != weights

    model = load_pretrained(tmp_path / "model.safetensors")  # 1 process, rebuilt from metadata alone
    assert not model.training
    with torch.no_grad():
        out, _ = model(ref["x"], ref["t"], ref["y"])
    assert ref["out"].abs().max() > 1e-3  # the final layer has left its zero init
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-6)


def test_export_metadata_and_tag_selection(live, tmp_path):
    run_dir, _ = live
    out = tmp_path / "w.safetensors"
    for source in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "step_00000003"):
        assert cli(["export", "--checkpoint", str(source), "--out", str(out)]) == 0
    from promoe_ds.export import read_metadata

    meta = read_metadata(out)
    cfg = load_config(TINY)
    assert json.loads(meta["config"])["hidden_size"] == cfg.model.hidden_size
    assert json.loads(meta["config"])["pos_embed"] == "dit"  # the layout recorded
    assert json.loads(meta["objective"])["name"] == "flow"
    assert (meta["step"], meta["weights"], meta["promoe_ds_version"]) == ("3", "ema", "0.1.0")
    assert json.loads(meta["train_config"])["train"]["ep_size"] == 2
    assert not out.with_name(out.name + ".tmp").exists()


def copy_tag(run_dir, tmp_path):
    """The promoe-ds files of the live job's tag step_00000003, copied under tmp_path."""
    tag = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(run_dir / "checkpoints" / "step_00000003" / "promoe", tag / "promoe")
    shutil.copy(run_dir / "checkpoints" / "step_00000003" / "meta.json", tag)
    return tag


def export_refused(capsys, checkpoint, out) -> str:
    """``promoe-ds export`` that must fail with one ``error:`` line (returned) and exit code 2."""
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("remove,needle", [("promoe/experts_ep0001.pt", "experts_ep0001.pt"),
                                           ("meta.json", "meta.json"), ("promoe/dense.pt", "dense.pt")])
def test_export_refuses_incomplete_checkpoint(live, tmp_path, capsys, remove, needle):
    tag = copy_tag(live[0], tmp_path)
    (tag / remove).unlink()
    dest = tmp_path / "export"
    dest.mkdir()
    assert needle in export_refused(capsys, tag, dest / "w.safetensors")
    assert list(dest.iterdir()) == []  # nothing under the final name, no leftover .tmp


@pytest.mark.parametrize("name,damage", [("promoe/dense.pt", "half"), ("promoe/dense.pt", "head"),
                                         ("promoe/experts_ep0001.pt", "garbage"), ("meta.json", "half"),
                                         ("meta.json", "garbage")])
def test_export_refuses_corrupt_checkpoint_files(live, tmp_path, capsys, name, damage):
    tag = copy_tag(live[0], tmp_path)
    data = (tag / name).read_bytes()
    damaged = {"half": data[:len(data) // 2], "head": data[:5000], "garbage": b"\x89 not a checkpoint \xff" * 10}
    (tag / name).write_bytes(damaged[damage])
    dest = tmp_path / "export"
    dest.mkdir()
    err = export_refused(capsys, tag, dest / "w.safetensors")
    assert f"{tag / name}" in err and "corrupt" in err and "--tag" in err, err
    assert list(dest.iterdir()) == []


def test_export_refuses_an_out_that_cannot_be_a_file(live, tmp_path, capsys):
    run_dir, _ = live
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("keep")
    assert "is a directory" in export_refused(capsys, run_dir, tmp_path / "dir")
    for out in (tmp_path / "file" / "w.safetensors", tmp_path / "file" / "sub" / "w.safetensors"):
        assert f"{tmp_path / 'file'}' is a file, not a directory" in export_refused(capsys, run_dir, out)
    assert list((tmp_path / "dir").iterdir()) == [] and (tmp_path / "file").read_text() == "keep"


def test_export_names_missing_latest(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert cli(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "latest" in capsys.readouterr().err


def test_corrupt_or_truncated_file_is_a_clear_error(live, tmp_path):
    run_dir, _ = live
    good = tmp_path / "w.safetensors"
    cli(["export", "--checkpoint", str(run_dir), "--out", str(good)])
    data = good.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"not a safetensors file" * 10)):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ConfigError, match=f"cannot read weights file .*{name}.safetensors"):
            load_pretrained(bad)
    with pytest.raises(ConfigError, match="missing.safetensors' does not exist"):
        load_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="is a directory: pass the .safetensors file in it"):
        load_pretrained(tmp_path)


def test_load_into_an_expert_parallel_slice_and_shape_mismatch(live, tmp_path):
    run_dir, ref = live
    f = tmp_path / "w.safetensors"
    cli(["export", "--checkpoint", str(run_dir), "--weights", "model", "--out", str(f)])
    cfg = load_config(TINY).model
    from promoe_ds.parallel.ep import shard_experts

    part = build_model(cfg, seed=1)
    shard_experts(part, 2, 1)  # holds global experts 2 and 3
    load_into(part, f)
    full = ref["live"]["model"]
    for name, p in part.named_parameters():
        want = full[name][2:4] if routed_expert_layer(name) else full[name]
        assert torch.equal(p, want), name
    other = load_config(TINY, ["model.hidden_size=32"]).model
    with pytest.raises(ConfigError, match="hidden_size: 64 in the file, 32 here"):
        load_into(build_model(other), f)


def test_finetune_from_export_with_other_ep_size_starts_from_its_weights(live, tmp_path):
    """train.init_from with ep_size 1 (the export came from ep_size 2): with lr 0 the weights after
    the first step are the file's, and the first logged loss is the file's model's loss."""
    run_dir, _ = live
    f = tmp_path / "w.safetensors"
    cli(["export", "--checkpoint", str(run_dir), "--weights", "model", "--out", str(f)])
    overrides = ["train.global_batch=8", "train.seed=11", "train.lr=0.0", "train.steps=1", "train.log_every=1",
                 "train.ckpt_every=1", "train.ep_size=1"]
    run(1, overrides + [f"train.init_from={f}", f"train.out_dir={tmp_path / 'ft'}"], tmp_path / "log")

    weights = load_file(f)
    own = tmp_path / "ft/checkpoints/step_00000001/promoe"
    saved = dict(torch.load(own / "dense.pt"))
    saved.update(torch.load(own / "experts_ep0000.pt")["params"])
    assert saved.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(saved[name]["model"], w) and torch.equal(saved[name]["ema"], w), name

    from promoe_ds.data import build_latent_source
    from promoe_ds.train import step_draws

    cfg = load_config(TINY, overrides)
    m = cfg.model
    shape = (m.in_channels, m.input_size, m.input_size)
    x0, y = build_latent_source(cfg.data, latent_shape=shape, num_classes=m.num_classes, micro_batch=8, rank=0,
                                world_size=1, seed=cfg.train.seed).next_batch()
    objective = build_objective(cfg.objective)
    draws = step_draws(objective, cfg, 0, shape, range(8))
    y = torch.where(draws.pop("drop"), torch.full_like(y, m.num_classes), y)
    model = load_pretrained(f).train()
    loss = objective.training_losses(lambda xt, tt: model(xt, tt, y)[0], x0, draws)["loss"].item()
    assert metrics(tmp_path / "ft")[0]["loss"] == pytest.approx(loss, rel=1e-6)
