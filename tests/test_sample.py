"""Sampling: CFG passes, determinism across ranks, resumability, outputs, VAE decoding."""
import json
import sys

import numpy as np
import pytest
import torch
from authors_reference import authors_flow_sampler
from PIL import Image

from promoe_ds import load_pretrained
from promoe_ds.cli import build_parser as cli_parser
from promoe_ds.cli import main as cli
from promoe_ds.config import ConfigError, load_config, to_dict
from promoe_ds.diffusion import build_objective
from promoe_ds.export import write_safetensors
from promoe_ds.models.dit import build_model
from promoe_ds.quickstart import tiny_vae
from promoe_ds.sample import class_labels, generate, guided, sampling_objective, use_compile

from dist_utils import TINY, spawn_local

LATENT = 8  # tiny_cpu.yaml: 4x8x8 latents; the 2-level test VAE decodes them to 16x16 pictures


def weights_file(path, objective="flow"):
    """A random tiny ProMoE (non-zero output layer) in the export format."""
    cfg = load_config(TINY, [f"objective.name={objective}", "model.depth=2"])
    model = build_model(cfg.model, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    write_safetensors(dict(model.state_dict()), {"config": json.dumps(to_dict(cfg.model)), "step": "0",
                                                 "objective": json.dumps(to_dict(cfg.objective)), "weights": "model",
                                                 "promoe_ds_version": "test", "source": "test"}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    tiny_vae(d / "vae", levels=2)
    return {"flow": weights_file(d / "flow.safetensors"), "ddpm": weights_file(d / "ddpm.safetensors", "ddpm"),
            "vae": d / "vae"}


def sample_args(files, out, objective="flow", *extra):
    return ["sample", "--weights", str(files[objective]), "--vae", str(files["vae"]), "--out", str(out), "--steps", "3",
            "--batch-size", "2", *extra]


class Counting(torch.nn.Module):
    """The model, counting forward passes and their batch sizes / null labels."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.cfg, self.num_classes = model.cfg, model.num_classes

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], int((y == self.num_classes).sum())))
        return self.model(x, t, y)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_cfg_one_pass_per_step(files, objective):
    model = Counting(load_pretrained(files[objective]))
    obj = build_objective(load_config(None, {"objective": {"name": objective}}).objective)
    idx = [0, 1, 2]
    y = class_labels(idx, [4, 5, 6], 10, 0)
    generate(model, obj, idx, y, steps=4, cfg_scale=1.0, seed=0)
    assert model.calls == [(3, 0)] * 4  # scale 1: exactly one conditional pass per step
    model.calls.clear()
    generate(model, obj, idx, y, steps=4, cfg_scale=1.5, seed=0)
    assert model.calls == [(6, 3)] * 4  # one pass over [x, x] with labels [y, null] per step


def test_cfg_combines_conditional_and_null_label_passes(files):
    model = load_pretrained(files["ddpm"])
    x, t, y = torch.randn(3, 4, LATENT, LATENT), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = guided(model, y, 1.5)(x, t)
        c = model(x, t, y)[0]
        u = model(x, t, torch.full_like(y, 10))[0]  # null label: the unconditional expert (Appendix B)
    torch.testing.assert_close(out[:, :4], u[:, :4] + 1.5 * (c[:, :4] - u[:, :4]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 4:], c[:, 4:], rtol=1e-5, atol=1e-6)  # variance: conditional pass
    assert not torch.allclose(c, u)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_flow_sampler_equals_the_authors_procedure(files, cfg_scale):
    """Same weights, noise and labels: the latents of the authors' diffusers-based sampler to float32 rounding,
    with a trained shift of 2 and their sample_shift 1.5 (effective 3), as ``--sample-shift 1.5`` does."""
    model = load_pretrained(files["flow"])
    noise, y = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 5, 9])
    meta = {"objective": json.dumps({"name": "flow", "shift": 2.0})}
    with torch.no_grad():
        ref = authors_flow_sampler(model, noise, y, 6, cfg_scale, shift=2.0, sample_shift=1.5)
        ours = build_objective(sampling_objective(meta, 1.5)).sample(guided(model, y, cfg_scale), noise, 6)
        trained_shift_only = build_objective(sampling_objective(meta)).sample(guided(model, y, cfg_scale), noise, 6)
    assert (ref - noise).abs().max() > 1  # the model moves the latents
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (trained_shift_only - ref).abs().max() > 1e-2  # the sample shift matters at this precision


def test_sample_shift_and_cfg_channels_options(files, tmp_path, capsys):
    assert sampling_objective({"objective": json.dumps({"name": "flow", "shift": 2.0})}, 1.5).shift == 3.0
    err = sample_refused(capsys, sample_args(files, tmp_path / "s", "ddpm", "--sample-shift", "2"))
    assert "--sample-shift: only rectified-flow weights" in err
    model = load_pretrained(files["ddpm"])
    x, t, y = torch.randn(2, 4, LATENT, LATENT), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out = guided(model, y, 1.5, channels=3)(x, t)  # facebookresearch/DiT's forward_with_cfg
        c, u = model(x, t, y)[0], model(x, t, torch.full_like(y, 10))[0]
    torch.testing.assert_close(out[:, :3], u[:, :3] + 1.5 * (c[:, :3] - u[:, :3]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 3:], c[:, 3:], rtol=1e-5, atol=1e-6)


def test_compile_switch(tmp_path):
    """--compile: auto compiles on CUDA only; 'on' runs the compiled model (a dense one-block model: one graph,
    so the CPU compilation stays short) and gives the eager images."""
    from torch._dynamo.utils import counters

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_compile("auto", cuda, bf16=True) and not use_compile("auto", cuda, bf16=False)
    assert not use_compile("auto", cpu, bf16=False) and not use_compile("auto", cpu, bf16=True)
    assert use_compile("on", cpu, bf16=False) and not use_compile("off", cuda, bf16=True)
    cfg = load_config(TINY, ["model.preset=DiT-S", "model.depth=1", "model.hidden_size=32", "model.num_heads=2"])
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.1)  # a non-zero velocity
    dense = tmp_path / "dense.safetensors"
    meta = {"config": json.dumps(to_dict(cfg.model)), "step": "0", "source": "test",
            "objective": json.dumps(to_dict(cfg.objective)), "weights": "model", "promoe_ds_version": "test"}
    write_safetensors(dict(model.state_dict()), meta, dense)
    tiny_vae(tmp_path / "vae", levels=2)
    files = {"flow": dense, "vae": tmp_path / "vae"}
    counters.clear()
    for flag in ("auto", "on"):
        assert cli(sample_args(files, tmp_path / flag, "flow", "--num-samples", "2", "--compile", flag)) == 0
        assert counters["stats"]["unique_graphs"] == (flag == "on")  # auto: eager on the CPU
    eager, compiled = (np.load(tmp_path / f / "samples.npz")["arr_0"].astype(int) for f in ("auto", "on"))
    assert np.abs(eager - compiled).max() <= 1 and eager.std() > 0


def test_outputs_resume_and_settings_check(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli(sample_args(files, out, "flow", "--num-samples", "5", "--classes", "1,2", "--cfg-scale", "1.5")) == 0
    pngs = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (5, 2 * LATENT, 2 * LATENT, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [1, 2, 1, 2, 1]
    assert np.array_equal(np.asarray(Image.open(pngs[3])), npz["arr_0"][3])
    assert npz["arr_0"].std() > 0
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * (2 * LATENT + 2) + 2, 3 * (2 * LATENT + 2) + 2, 3)  # 5 images: 2 rows of 3
    assert "sampled 5 new images" in capsys.readouterr().out

    original = npz["arr_0"].copy()
    pngs[3].unlink()
    Image.fromarray(np.zeros_like(original[1])).save(pngs[1])  # an existing PNG is skipped, not redone
    assert cli(sample_args(files, out, "flow", "--num-samples", "6", "--classes", "1,2", "--cfg-scale", "1.5")) == 0
    assert "sampled 2 new images" in capsys.readouterr().out  # 000003 again and the new 000005
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape[0] == 6 and np.array_equal(arr[3], original[3]) and not arr[1].any()

    assert cli(sample_args(files, out, "flow", "--num-samples", "6", "--classes", "1,2", "--cfg-scale", "2.0")) == 2
    assert "other settings" in capsys.readouterr().err


def test_same_images_on_one_and_two_processes(files, tmp_path):
    """Random classes and DDPM's per-step noise: sample i depends on (seed, i) only."""
    args = ["--num-samples", "7", "--cfg-scale", "1.5", "--seed", "3"]
    assert cli(sample_args(files, tmp_path / "one", "ddpm", *args)) == 0
    argv = [sys.executable, "-m", "promoe_ds.cli", *sample_args(files, tmp_path / "two", "ddpm", *args)]
    procs = spawn_local(2, argv, log_dir=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    one, two = np.load(tmp_path / "one/samples.npz"), np.load(tmp_path / "two/samples.npz")
    assert np.array_equal(one["arr_1"], two["arr_1"]) and len(set(one["arr_1"].tolist())) > 1
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert "sampled 7 new images on 2 rank(s)" in (tmp_path / "rank0.log").read_text()


def sample_refused(capsys, args) -> str:
    """``promoe-ds sample`` that must fail with one ``error:`` line (returned) and exit code 2."""
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unloadable_vae_is_a_clear_error(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for vae, message in ((tmp_path / "empty", "cannot load the VAE"),
                         (tmp_path / "absent", "absent: no such directory")):
        assert message in sample_refused(capsys, ["sample", "--weights", str(files["flow"]), "--vae", str(vae), "--out",
                                                  str(tmp_path / "s"), "--num-samples", "1", "--steps", "2"])


@pytest.mark.parametrize("arg,message", [("--cfg-scale=nan", "--cfg-scale must be a finite number, got nan"),
                                         ("--cfg-scale=inf", "--cfg-scale must be a finite number, got inf"),
                                         ("--cfg-scale=-inf", "--cfg-scale must be a finite number, got -inf"),
                                         ("--device=cuda", "--device cuda: this machine has 0 CUDA GPU(s)"),
                                         ("--device=cuda:1", "--device cuda:1: this machine has 0 CUDA GPU(s)"),
                                         ("--device=gpu", "--device 'gpu' is not a device"),
                                         ("--sample-shift=0", "--sample-shift must be a finite number > 0, got 0.0"),
                                         ("--sample-shift=nan", "--sample-shift must be a finite number > 0, got nan"),
                                         ("--cfg-channels=5", "--cfg-channels must be in 1..4"),
                                         ("--cfg-channels=0", "--cfg-channels must be in 1..4")])
def test_bad_flag_values_are_refused_before_sampling(files, tmp_path, capsys, monkeypatch, arg, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without CUDA
    err = sample_refused(capsys, sample_args(files, tmp_path / "s", "flow", "--num-samples", "2", arg))
    assert message in err, err
    assert not (tmp_path / "s").exists()


def test_weights_with_corrupt_json_metadata(files, tmp_path, capsys):
    good = {"config": json.dumps(to_dict(load_config(TINY).model)), "objective": '{"name": "flow"}'}
    for key, text in (("config", '{"depth": 2,'), ("objective", "[1, 2]")):
        bad = tmp_path / f"bad_{key}.safetensors"
        write_safetensors({"x": torch.zeros(1)}, {**good, key: text}, bad)
        with pytest.raises(ConfigError, match=f"its '{key}' metadata is not a JSON object"):
            load_pretrained(bad)
        err = sample_refused(capsys, sample_args({**files, "flow": bad}, tmp_path / "s", "flow", "--num-samples", "1"))
        assert str(bad) in err and "export the checkpoint again" in err
    no_objective = tmp_path / "no_objective.safetensors"  # config, but no objective: one line, not a KeyError
    write_safetensors({"x": torch.zeros(1)}, {"config": good["config"]}, no_objective)
    args = sample_args({**files, "flow": no_objective}, tmp_path / "s", "flow", "--num-samples", "1")
    err = sample_refused(capsys, args)
    assert f"weights file '{no_objective}' has no 'objective' metadata" in err and "export the checkpoint again" in err


def test_eval_cli_hands_the_npz_to_main_eval(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("promoe_ds.evaluate.main_eval", lambda *a, **kw: seen.update(args=a, kwargs=kw))
    assert cli(["eval", "--samples", "s.npz", "--ref", "r.npz", "--inception", "w.pth", "--batch-size", "8"]) == 0
    assert seen == {"args": ("s.npz", "r.npz", "w.pth"), "kwargs": {"batch_size": 8, "device": "auto"}}


def test_the_multi_gpu_command_gets_through_torchrun():
    """docs/sampling.md starts sampling under torchrun: its parser must leave every sample flag to promoe-ds (an
    abbreviation of one of its own options, such as --num of --numa-binding, stops it)."""
    from torch.distributed.run import get_args_parser

    argv = ["--nproc_per_node", "8", "-m", "promoe_ds.cli", "sample", "--weights", "W", "--num-samples", "50000",
            "--cfg-scale", "1.5", "--steps", "250", "--batch-size", "64", "--vae", "V", "--out", "DIR", "--seed", "0",
            "--classes", "1,2", "--device", "auto", "--precision", "auto", "--compile", "off", "--sample-shift", "1.5",
            "--cfg-channels", "3"]
    args = get_args_parser().parse_args(argv)
    assert args.training_script == "promoe_ds.cli" and args.training_script_args == argv[4:]
    assert cli_parser().parse_args(argv[4:]).num == 50000
