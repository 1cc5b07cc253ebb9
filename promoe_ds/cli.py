"""``promoe-ds`` command line: one subcommand per stage of the pipeline.

Configuration mistakes are printed as one line (``error: ...``) with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from promoe_ds.config import ConfigError, ExpertSpec, load_config, run_command


def cmd_info(args) -> None:
    from promoe_ds.models.dit import count_params

    cfg = load_config(args.config, [f"model.preset={args.model}"] if args.model else []) if (
        args.model or args.config) else None
    if cfg is None:
        raise ConfigError("info needs --model NAME or --config FILE")
    m = cfg.model
    counts = count_params(m)
    info = {
        "model": m.preset or "custom",
        "total_params": counts["total_params"],
        "activated_params": counts["activated_params"],
        "depth": m.depth, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
        "patch_size": m.patch_size, "input_size": m.input_size,
        "router": m.moe.router,
        "experts": str(m.moe.spec()) if m.moe.router != "none" else None,
        "moe_blocks": counts["moe_blocks"],
    }
    if args.json:
        print(json.dumps(info))
        return
    print(f"{info['model']}: depth {m.depth}, hidden {m.hidden_size}, heads {m.num_heads}, "
          f"patch {m.patch_size}, {(m.input_size // m.patch_size) ** 2} tokens")
    print(f"  total params     {info['total_params'] / 1e6:10.1f}M")
    print(f"  activated params {info['activated_params'] / 1e6:10.1f}M  (one conditional token)")
    if m.moe.router != "none":
        spec: ExpertSpec = m.moe.spec()
        print(f"  router {m.moe.router}, experts {spec}: {spec.routed} routed (top-{spec.top_k}), "
              f"{spec.shared} shared, {spec.uncond} unconditional")
        print(f"  MoE blocks {counts['moe_blocks']} (others dense)")


def cmd_train(args) -> int:
    from promoe_ds.train import main as train_main

    return train_main(args.config, args.overrides)


def cmd_export(args) -> None:
    from promoe_ds.export import export

    meta = export(args.checkpoint, args.out, tag=args.tag, weights=args.weights)
    print(f"exported {args.weights} weights of step {meta['step']} ({meta['source']}) -> {args.out}")


def cmd_import(args) -> None:
    from promoe_ds.official import import_checkpoint, summary

    meta = import_checkpoint(args.checkpoint, args.out, weights=args.weights, router=args.router, top_k=args.top_k,
                             num_heads=args.num_heads, vae=args.vae)
    print(f"imported {args.weights} weights of {meta['source']} -> {args.out}: {summary(meta)}")


def cmd_sample(args) -> None:
    from promoe_ds.sample import main_sample

    main_sample(args)


def cmd_eval(args) -> None:
    from promoe_ds.evaluate import main_eval

    main_eval(args.samples, args.ref, args.inception, batch_size=args.batch_size, device=args.device)


def cmd_quickstart(args) -> None:
    from promoe_ds.quickstart import main as quickstart_main

    quickstart_main(args.out, args.steps)


def add_stage_subparsers(sub) -> None:
    """export / sample / eval / quickstart."""
    s = sub.add_parser("export", help="consolidate a checkpoint (any layout) into one .safetensors file")
    s.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory or a tag directory")
    s.add_argument("--tag", help="checkpoint tag, e.g. step_00100000 (default: the one 'latest' names)")
    s.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default, used for every "
                                                                              "reported result) or raw weights")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="an official checkpoint (ali-vilab/ProMoE, facebookresearch/DiT) as a "
                                      "promoe-ds .safetensors file for sample, eval and train.init_from")
    s.add_argument("--checkpoint", required=True, help="ckpt_step_*.pth (ali-vilab/ProMoE) or DiT-XL-2-*.pt "
                                                       "(facebookresearch/DiT)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="ali-vilab/ProMoE: the EMA (default, the released results) or the raw weights")
    s.add_argument("--router", choices=("promoe", "promoe_ec"), default="promoe",
                   help="ProMoE: token choice (models_ProMoE_TC.py, default) or expert choice (models_ProMoE_EC.py); "
                        "the tensors are the same")
    s.add_argument("--top-k", type=int, default=1, help="ProMoE: routed experts per token (1: the released models)")
    s.add_argument("--num-heads", type=int, help="attention heads, for a size that is no preset's")
    s.add_argument("--vae", help="VAE recorded for sampling (default: sd-vae-ft-mse for ProMoE, sd-vae-ft-ema for DiT)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("sample", help="images (PNGs, grid, ADM .npz) from an exported file; 1 CPU, 1 or many GPUs")
    s.add_argument("--weights", required=True, help="exported .safetensors (promoe-ds export)")
    # not "--num": torchrun's parser reads it as an ambiguous abbreviation of its own --numa-binding
    s.add_argument("--num-samples", dest="num", type=int, default=64, help="number of images (50000 for FID-50K)")
    s.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale; 1.0 = off")
    s.add_argument("--steps", type=int, default=250, help="Euler steps (flow) or respaced steps (ddpm)")
    s.add_argument("--classes", default="", help="comma-separated class indices (cycled), 'all' (0..K-1 cycled: "
                                                "class-balanced), or empty: a random class per sample")
    s.add_argument("--seed", type=int, default=0, help="sample i depends on (seed, i) only")
    s.add_argument("--out", help="output folder (default samples/<weights>-cfg<s>-steps<n>-seed<seed>)")
    s.add_argument("--vae", help="hub id or local AutoencoderKL directory (default: the one the training latents "
                                 "were encoded with, from the file's metadata, else stabilityai/sd-vae-ft-ema)")
    s.add_argument("--batch-size", type=int, default=32, help="images per forward pass and rank (x2 with CFG)")
    s.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU) | cpu | cuda | cuda:N")
    s.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    s.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model; auto: on for CUDA, off on the CPU")
    s.add_argument("--sample-shift", type=float, default=1.0,
                   help="flow: extra timestep shift, times the trained one (the authors' sample_shift)")
    s.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N latent channels (default: all; facebookresearch/DiT's numbers: 3)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("eval", help="FID, sFID, IS, precision, recall of a sample .npz (ADM protocol)")
    s.add_argument("--samples", required=True, help="ADM-format .npz of generated images (promoe-ds sample)")
    s.add_argument("--ref", required=True, help="reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    s.add_argument("--inception", required=True, help="FID Inception-v3 weights (see docs/evaluate.md)")
    s.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    s.add_argument("--device", default="auto", help="auto (the GPU, else CPU) | cpu | cuda | cuda:N")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("quickstart", help="the whole pipeline on a CPU in minutes: toy data -> train -> sample")
    s.add_argument("--out", default="runs/quickstart",
                   help="folder for the toy data, the run, the export and the samples")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: configs/quickstart.yaml)")
    s.set_defaults(func=cmd_quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promoe-ds", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and layer layout of a model")
    s.add_argument("--model", help="preset name, e.g. ProMoE-XL")
    s.add_argument("--config", help="YAML config (its model section)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train on DeepSpeed (one process per device; see README for launchers)")
    s.add_argument("--config", required=True,
                   help="YAML config file, e.g. configs/tiny_cpu.yaml (the defaults alone are a large model)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 train.ep_size=2")
    s.set_defaults(func=cmd_train)

    from promoe_ds.scaling import add_subparser as add_scaling_report  # slurm/scaling.sh's report

    add_scaling_report(sub)
    add_stage_subparsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
