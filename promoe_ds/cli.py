"""``promoe-ds`` command line: one subcommand per stage of the pipeline.

Configuration mistakes are printed as one line (``error: ...``) with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from promoe_ds.config import ConfigError, ExpertSpec, load_config


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promoe-ds", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and layer layout of a model")
    s.add_argument("--model", help="preset name, e.g. ProMoE-XL")
    s.add_argument("--config", help="YAML config (its model section)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train on DeepSpeed (one process per device; see README for launchers)")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 train.ep_size=2")
    s.set_defaults(func=cmd_train)

    from promoe_ds.scaling import add_subparser as add_scaling_report  # slurm/scaling.sh's report

    add_scaling_report(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
