"""``promoe-ds import``: the authors' checkpoints (ali-vilab/ProMoE, facebookresearch/DiT) as promoe-ds files.

The official-format checkpoints and the official models' outputs in tests/assets/official were made once by
running the public code (make_goldens.py there records how and at which commits); these tests need only them.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from promoe_ds import load_pretrained
from promoe_ds.cli import main as cli
from promoe_ds.export import consolidate, read_metadata
from promoe_ds.models.dit import build_model
from promoe_ds.official import convert, model_config, read_source
from promoe_ds.sample import guided

from dist_utils import metrics, run

OFFICIAL = Path(__file__).parent / "assets" / "official"
GOLD = torch.load(OFFICIAL / "goldens.pt")
TOL = dict(rtol=1e-5, atol=1e-5)  # float32, other summation orders (grouped experts, fused attention)


def imported(tmp_path, name: str, *args: str) -> Path:
    out = tmp_path / f"{name}.safetensors"
    assert cli(["import", "--checkpoint", str(OFFICIAL / name), "--out", str(out), "--num-heads", "2", *args]) == 0
    return out


@pytest.mark.parametrize("name,args,key,t", [
    ("promoe.pth", [], "tc_ema", "t_flow"),  # models_ProMoE_TC.py, EMA weights
    ("promoe.pth", ["--weights", "model"], "tc_model", "t_flow"),
    ("promoe.pth", ["--router", "promoe_ec"], "ec_ema", "t_flow"),  # models_ProMoE_EC.py
    ("dense.pth", [], "dense_ema", "t_flow"),  # models_DiT.py
    ("DiT-tiny.pt", [], "dit", "t_ddpm"),  # facebookresearch/DiT, learned sigma
])
def test_imported_model_gives_the_official_outputs(tmp_path, name, args, key, t):
    model = load_pretrained(imported(tmp_path, name, *args))
    x, y = GOLD["x"], GOLD["y"]  # y holds null labels: their tokens take the unconditional expert
    with torch.no_grad():
        torch.testing.assert_close(model(x, GOLD[t], y)[0], GOLD[key], **TOL)
        if name != "DiT-tiny.pt":  # CFG as ProMoE's sample.py forms it: every channel of two passes
            got = guided(model, GOLD["y_cond"], GOLD["cfg_scale"])(x, GOLD[t])[:, :4]
            torch.testing.assert_close(got, GOLD[key + "_cfg"], **TOL)


def test_dit_guidance_with_three_channels_is_forward_with_cfg(tmp_path):
    """DiT's forward_with_cfg guides latent channels 0-2 only (--cfg-channels 3); the variance channels come from
    the conditional pass."""
    model = load_pretrained(imported(tmp_path, "DiT-tiny.pt"))
    x, t, y = GOLD["x"][:3], GOLD["t_ddpm"][:3], GOLD["y_cond"][:3]
    with torch.no_grad():
        torch.testing.assert_close(guided(model, y, GOLD["cfg_scale"], 3)(x, t), GOLD["dit_cfg"][:3], **TOL)
        assert (guided(model, y, GOLD["cfg_scale"])(x, t)[:, 3] - GOLD["dit_cfg"][:3, 3]).abs().max() > 1e-3


def test_expert_choice_is_per_sample_as_the_official_code():
    """The EC import routes each sample's tokens apart (model.moe.ec_group=sample); promoe-ds' batch-wide choice
    would give other outputs for the same weights."""
    state, kind, _ = read_source(OFFICIAL / "promoe.pth", "ema")
    cfg = model_config(state, kind, router="promoe_ec", top_k=1, num_heads=2)
    assert cfg.moe.ec_group == "sample"
    tensors = convert(state, cfg)
    outs = {}
    for group in ("sample", "batch"):
        cfg.moe.ec_group = group
        model = build_model(cfg).eval()
        model.load_state_dict(tensors, strict=True)
        with torch.no_grad():
            outs[group] = model(GOLD["x"], GOLD["t_flow"], GOLD["y"])[0]
            alone = model(GOLD["x"][3:4], GOLD["t_flow"][3:4], GOLD["y"][3:4])[0]
        if group == "sample":  # a sample's output does not depend on the rest of the batch
            torch.testing.assert_close(alone, outs[group][3:4], **TOL)
    torch.testing.assert_close(outs["sample"], GOLD["ec_ema"], **TOL)
    assert (outs["batch"] - GOLD["ec_ema"]).abs().max() > 1e-2


def test_round_trip_of_experts_unconditional_expert_and_prototypes(tmp_path):
    src = torch.load(OFFICIAL / "promoe.pth")["ema_model_state_dict"]
    got = load_file(imported(tmp_path, "promoe.pth"))
    for block in (1, 3):  # every other block is MoE
        b = f"blocks.{block}.mlp"
        for j in range(4):  # routed experts keep their order
            assert torch.equal(got[f"{b}.routed_experts.w1"][j], src[f"{b}.experts.{j}.up_proj.weight"])
            assert torch.equal(got[f"{b}.routed_experts.b1"][j], src[f"{b}.experts.{j}.up_proj.bias"])
            assert torch.equal(got[f"{b}.routed_experts.w2"][j], src[f"{b}.experts.{j}.down_proj.weight"])
            assert torch.equal(got[f"{b}.routed_experts.b2"][j], src[f"{b}.experts.{j}.down_proj.bias"])
        assert torch.equal(got[f"{b}.uncond_experts.w1"][0], src[f"{b}.experts.4.up_proj.weight"])  # the last one
        assert torch.equal(got[f"{b}.uncond_experts.b2"][0], src[f"{b}.experts.4.down_proj.bias"])
        assert torch.equal(got[f"{b}.shared_experts.w2"][0], src[f"{b}.shared_expert.down_proj.weight"])
        assert torch.equal(got[f"{b}.prototypes"], src[f"{b}.cluster_centers"])
    assert torch.equal(got["y_embedder.weight"][1000], src["y_embedder.embedding_table.weight"][1000])  # null class
    assert "pos_embed" not in got  # a fixed buffer here, checked against the file's on import


def test_metadata_records_source_objective_and_vae(tmp_path):
    meta = read_metadata(imported(tmp_path, "promoe.pth"))
    assert meta["source"] == "promoe.pth" and meta["step"] == "123" and meta["weights"] == "ema"
    assert meta["source_sha256"] == hashlib.sha256((OFFICIAL / "promoe.pth").read_bytes()).hexdigest()
    assert meta["source_code"] == "ali-vilab/ProMoE models_ProMoE_TC.py"
    objective = json.loads(meta["objective"])
    assert [objective[k] for k in ("name", "shift", "logit_mean", "logit_std")] == ["flow", 1.0, 0, 1]
    assert (meta["vae"], float(meta["scale_factor"])) == ("stabilityai/sd-vae-ft-mse", 0.18215)
    cfg = json.loads(meta["config"])
    assert cfg["pos_embed"] == "dit" and cfg["moe"]["experts"] == "E6A1S1U1" and cfg["moe"]["router"] == "promoe"

    meta = read_metadata(imported(tmp_path, "DiT-tiny.pt"))
    objective = json.loads(meta["objective"])
    assert (objective["name"], objective["diffusion_steps"]) == ("ddpm", 1000) and "step" not in meta
    assert json.loads(meta["config"])["learn_sigma"] and meta["vae"] == "stabilityai/sd-vae-ft-ema"


def official_shapes(depth: int, d: int, *, grid: int = 16, moe: bool, routed: int = 12, width: int = 0) -> dict:
    """The state-dict shapes of the public code's models (the key layout of models_ProMoE_TC.py / models.py)."""
    s = {"x_embedder.proj.weight": (d, 4, 2, 2), "x_embedder.proj.bias": (d,), "pos_embed": (1, grid * grid, d),
         "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
         "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (1001, d),
         "final_layer.linear.weight": (32, d), "final_layer.linear.bias": (32,),
         "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d),
                  b + "attn.proj.bias": (d,), b + "adaLN_modulation.1.weight": (6 * d, d),
                  b + "adaLN_modulation.1.bias": (6 * d,)})
        if moe and i % 2:
            s[b + "mlp.cluster_centers"] = (routed, d)
            for e in [f"experts.{j}" for j in range(routed + 1)] + ["shared_expert"]:
                s.update({f"{b}mlp.{e}.up_proj.weight": (width, d), f"{b}mlp.{e}.up_proj.bias": (width,),
                          f"{b}mlp.{e}.down_proj.weight": (d, width), f"{b}mlp.{e}.down_proj.bias": (d,)})
        else:
            s.update({b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d),
                      b + "mlp.fc2.bias": (d,)})
    return {k: torch.empty(v, device="meta") for k, v in s.items()}


@pytest.mark.parametrize("kind,shapes,preset,input_size", [
    ("promoe", official_shapes(28, 1152, moe=True, width=2304), "ProMoE-XL", 32),  # ckpt_step_500000.pth, XL
    ("promoe", official_shapes(12, 768, moe=True, width=1536), "ProMoE-B", 32),
    ("dit", official_shapes(28, 1152, moe=False), "DiT-XL", 32),  # DiT-XL-2-256x256.pt
    ("dit", official_shapes(28, 1152, grid=32, moe=False), "DiT-XL", 64),  # DiT-XL-2-512x512.pt
])
def test_released_sizes_match_their_presets(kind, shapes, preset, input_size):
    cfg = model_config(shapes, kind, router="promoe", top_k=1, num_heads=None)
    assert (cfg.preset, cfg.input_size, cfg.num_classes, cfg.learn_sigma) == (preset, input_size, 1000, True)
    if preset.startswith("ProMoE"):
        assert (cfg.moe.experts, cfg.moe.expert_mlp_ratio, cfg.moe.every) == ("E14A1S1U1", 2.0, 2)
    else:
        assert cfg.moe.router == "none" and cfg.num_heads == 16


def edited(tmp_path, name: str, edit) -> Path:
    """A copy of an official checkpoint whose EMA state dict ``edit`` changed."""
    ckpt = torch.load(OFFICIAL / name)
    edit(ckpt["ema_model_state_dict"] if isinstance(ckpt.get("ema_model_state_dict"), dict) else ckpt)
    path = tmp_path / f"edited_{name}"
    torch.save(ckpt, path)
    return path


def wrong_pos_embed(s):
    s["pos_embed"] = s["pos_embed"].flip(-1)


def narrow_expert(s):
    s["blocks.3.mlp.experts.2.up_proj.weight"] = torch.ones(8, 16)


def transposed(s):
    s["blocks.0.attn.proj.weight"] = torch.zeros(16, 8)


@pytest.mark.parametrize("make,args,needles", [
    (lambda p: p / "absent.pth", [], ["absent"]),
    (lambda p: p, [], ["a directory"]),
    (lambda p: (p / "x.pth").write_bytes(b"junk\n") and p / "x.pth", [], ["not a torch.save archive"]),
    (lambda p: (p / "t.pth").write_bytes((OFFICIAL / "dense.pth").read_bytes()[:5000]) and p / "t.pth", [],
     ["t.pth"]),  # truncated
    (lambda p: torch.save({"step": 3}, p / "d.pth") or p / "d.pth", [], ["holds a dict with keys ['step']"]),
    (lambda p: torch.save({"w": torch.ones(2)}, p / "m.pt") or p / "m.pt", [], ["no 'x_embedder.proj.weight'"]),
    (lambda p: edited(p, "promoe.pth", lambda s: s.pop("blocks.1.attn.qkv.bias")), [],
     ["1 parameter(s) not filled: blocks.1.attn.qkv.bias"]),
    (lambda p: edited(p, "promoe.pth", lambda s: s.update({"blocks.2.attn.extra": torch.ones(1)})), [],
     ["1 unused key(s): blocks.2.attn.extra"]),
    (lambda p: edited(p, "dense.pth", transposed), [], ["blocks.0.attn.proj.weight is [16, 8]", "shape mismatch"]),
    (lambda p: edited(p, "promoe.pth", narrow_expert), [],
     ["blocks.3.mlp.routed_experts.w1", "blocks.3.mlp.experts.2.up_proj.weight"]),
    (lambda p: edited(p, "promoe.pth", wrong_pos_embed), [], ["pos_embed is not the fixed"]),
    (lambda p: edited(p, "promoe.pth", lambda s: s.pop("blocks.1.mlp.experts.4.up_proj.weight")), [],
     ["blocks.1.mlp"]),
    (lambda p: OFFICIAL / "DiT-tiny.pt", ["--weights", "model"], ["bare state dict"]),
    (lambda p: OFFICIAL / "promoe.pth", ["--top-k", "5"], ["top-k"]),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, make, args, needles):
    src = make(tmp_path)
    capsys.readouterr()
    out = tmp_path / "o.safetensors"
    code = cli(["import", "--checkpoint", str(src), "--out", str(out), "--num-heads", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert all(n in errors[0] for n in needles), errors[0]
    assert not out.exists()


def test_a_size_that_is_no_preset_needs_num_heads(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert cli(["import", "--checkpoint", str(OFFICIAL / "dense.pth"), "--out", str(out)]) == 2
    assert "--num-heads" in capsys.readouterr().err


def test_fine_tuning_from_an_imported_file_with_expert_parallelism(tmp_path):
    """train.init_from of an imported expert-choice ProMoE file, 2 processes, ep_size 2: with lr 0 the weights after a
    step are the imported ones (each rank took its experts' rows); a routing setting the config does not share with
    the file is said once."""
    f = imported(tmp_path, "promoe.pth", "--router", "promoe_ec")
    out = tmp_path / "ft"
    run(2, ["model.depth=4", "model.hidden_size=16", "model.num_heads=2", "model.num_classes=1000",
            "model.moe.router=promoe_ec", "model.moe.experts=E6A1S1U1", "model.moe.expert_mlp_ratio=2.0",
            "train.ep_size=2", "train.lr=0.0", "train.global_batch=8", "train.steps=1", "train.ckpt_every=1",
            "train.log_every=1", f"train.init_from={f}", f"train.out_dir={out}"], tmp_path / "log")
    weights, meta = consolidate(out / "checkpoints" / "step_00000001", "model")
    want = load_file(f)
    assert weights.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(weights[name], w), name
    assert meta["config"]["model"]["pos_embed"] == "dit"
    assert torch.isfinite(torch.tensor(metrics(out)[0]["loss"]))
    log = (tmp_path / "log" / "rank0.log").read_text() + (tmp_path / "log" / "rank1.log").read_text()
    notes = [line for line in log.splitlines() if "init_from: other model settings" in line]
    assert len(notes) == 1 and "model.moe.ec_group: 'sample' in the file, 'batch' here" in notes[0], notes
    assert "backend" not in notes[0]  # how the experts are computed (loop here, auto in the file): not said


@pytest.mark.parametrize("name", ["promoe.pth", "DiT-tiny.pt"])
def test_promoe_ds_sample_reads_an_imported_file(tmp_path, name):
    """Flow (ProMoE) and DDPM (DiT) files sample with the objective their metadata records; the VAE's scale factor
    is checked against the recorded 0.18215 (the test VAE's, like sd-vae-ft-mse's)."""
    from promoe_ds.quickstart import tiny_vae

    tiny_vae(tmp_path / "vae", levels=2)
    out = tmp_path / "samples"
    assert cli(["sample", "--weights", str(imported(tmp_path, name)), "--vae", str(tmp_path / "vae"), "--out", str(out),
                "--num-samples", "2", "--steps", "2", "--classes", "3,999", "--batch-size", "2"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (2, 16, 16, 3) and list(npz["arr_1"]) == [3, 999]
