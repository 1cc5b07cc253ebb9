"""Model presets: the paper's Table 2 sizes, baselines with the same backbone, and a >10B preset.

A preset is a partial ModelConfig (as a dict); explicit config keys override it.
"""
from __future__ import annotations

from promoe_ds.config import ConfigError

# DiT sizes (Peebles & Xie 2023; paper Table 2): depth, hidden size, heads.
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def _presets() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for size, dims in _SIZES.items():
        out[f"DiT-{size}"] = dict(dims, moe=dict(router="none"))
        # ProMoE (Sec. 4.1): 12 routed + 1 shared + 1 unconditional expert, top-1, MoE every other block,
        # expert hidden width 2D (halved: two experts are active per token).
        out[f"ProMoE-{size}"] = dict(dims, moe=dict(router="promoe", experts="E14A1S1U1", expert_mlp_ratio=2.0))
        # Baselines of Tab. 1 / Tab. 9: E8A1, full-width experts, softmax router.
        out[f"TC-DiT-{size}"] = dict(dims, moe=dict(router="tc", experts="E8A1S0U0", expert_mlp_ratio=4.0,
                                                    lb_weight=0.01, rcl_weight=0.0))
        out[f"EC-DiT-{size}"] = dict(dims, moe=dict(router="ec", experts="E8A1S0U0", expert_mlp_ratio=4.0,
                                                    rcl_weight=0.0))
    # XL backbone with 16 routed experts: divisible by expert-parallel sizes 2, 4, 8 and 16.
    out["ProMoE-XL-E16"] = dict(_SIZES["XL"], moe=dict(router="promoe", experts="E18A1S1U1", expert_mlp_ratio=2.0))
    # 13.8B total, 3.0B activated (promoe-ds info --model ProMoE-H): for multi-node expert-parallel runs
    # (32 routed experts: ep_size up to 32).
    out["ProMoE-H"] = dict(depth=40, hidden_size=2048, num_heads=32,
                           moe=dict(router="promoe", experts="E34A1S1U1", expert_mlp_ratio=2.0))
    return out


PRESETS = _presets()


def preset_fields(name: str) -> dict:
    key = name.removesuffix("/2")  # accept the paper's "DiT-XL/2" spelling (patch 2)
    if key not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    fields = dict(PRESETS[key])
    fields["moe"] = dict(fields["moe"])
    return fields
