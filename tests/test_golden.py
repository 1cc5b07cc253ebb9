"""Golden loss curve: two tiny fixed training runs compared, step by step, with the values kept in
tests/assets/golden_loss.json.

The distributed tests compare one layout with another, so a numeric change that every layout shares (an
init, a loss weight, a schedule, the EMA) passes them unseen; this test catches it. A deliberate numeric
change regenerates the file and commits it with the change:

    python -m pytest tests/test_golden.py --update-golden

Recorded per step: the logged losses (objective loss and its parts, RCL, load balancing) and the gradient
norm before clipping; at the end, checksums of the weights and of their EMA (float64 sums over the
consolidated checkpoint, so they do not depend on the checkpoint's layout).
"""
import json
import math
from pathlib import Path

import pytest
import torch

from promoe_ds.export import consolidate

from dist_utils import metrics, run

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "assets" / "golden_loss.json"
STEPS = 8
COMMON = ["train.global_batch=8", "train.log_every=1", "train.seed=3", "objective.class_dropout=0.25",
          f"train.steps={STEPS}", f"train.ckpt_every={STEPS}"]
RUNS = {  # name: (processes, overrides)
    "one_zero0": (1, ["train.ep_size=1", "train.zero_stage=0"]),  # ZeRO-0: clipping inside the fused AdamW
    "ep2_zero2": (2, ["train.ep_size=2", "train.zero_stage=2"]),  # expert parallelism, DeepSpeed's ZeRO-2 step
}
PER_STEP = ("loss", "mse", "vlb", "rcl", "lb", "grad_norm")
RTOL = 1e-5  # float32 run to run on one machine: identical; other CPUs reduce in another order


def record(n: int, overrides: list[str], tmp_path: Path) -> dict:
    """Run a tiny training and return what the golden file keeps of it."""
    out = tmp_path / "run"
    run(n, COMMON + overrides + [f"train.out_dir={out}"], tmp_path / "log")
    steps = [{k: r[k] for k in ("step", *PER_STEP) if k in r} for r in metrics(out)]
    tag = out / "checkpoints" / f"step_{STEPS:08d}"
    weights, _ = consolidate(tag, "model")
    ema, _ = consolidate(tag, "ema")
    return {"steps": steps, "final": {
        "weights_sum": sum(t.double().sum().item() for t in weights.values()),
        "weights_norm": math.sqrt(sum(t.double().square().sum().item() for t in weights.values())),
        "ema_sum": sum(t.double().sum().item() for t in ema.values()),
        "ema_minus_weights_norm": math.sqrt(sum((ema[n].double() - w.double()).square().sum().item()
                                                for n, w in weights.items())),
    }}


def mismatches(want: dict, got: dict, rtol: float = RTOL) -> list[str]:
    """Every recorded value of ``got`` that is not within ``rtol`` of ``want`` (or is absent), named."""
    bad = []
    if [s["step"] for s in got["steps"]] != [s["step"] for s in want["steps"]]:
        return [f"steps {[s['step'] for s in got['steps']]} != {[s['step'] for s in want['steps']]}"]
    for w, g in zip(want["steps"], got["steps"]):
        bad += [f"step {w['step']} {k}: {g.get(k)} != {v}" for k, v in w.items()
                if k != "step" and not (k in g and math.isclose(g[k], v, rel_tol=rtol, abs_tol=1e-9))]
    bad += [f"final {k}: {got['final'].get(k)} != {v}" for k, v in want["final"].items()
            if not math.isclose(got["final"].get(k, math.nan), v, rel_tol=rtol, abs_tol=1e-9)]
    return bad


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_loss_curve(name, tmp_path, request):
    n, overrides = RUNS[name]
    got = record(n, overrides, tmp_path)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if request.config.getoption("--update-golden"):
        golden.setdefault("runs", {})[name] = {"processes": n, "overrides": COMMON + overrides, **got}
        golden["torch"] = torch.__version__
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {name} into {GOLDEN}: review the diff and commit it with the change")
    assert name in golden.get("runs", {}), f"no golden values for {name}: run pytest {__file__} --update-golden"
    bad = mismatches(golden["runs"][name], got)
    assert not bad, (f"{len(bad)} values differ from {GOLDEN.name} (a deliberate numeric change regenerates it with "
                     "--update-golden):\n" + "\n".join(bad[:20]))


@pytest.mark.parametrize("override,changed,only", [
    ("model.moe.rcl_weight=1.01", "step 1 grad_norm", False),  # lambda_RCL (Eq. 6) 1% higher: step 1's gradient
    ("train.ema_decay=0.9801", "final ema_", True),  # the EMA decay 0.99 -> 1% lower: the EMA, nothing else
])
def test_golden_curve_catches_a_one_percent_change(override, changed, only, tmp_path):
    """The comparison is tight enough to see a 1% change of a loss weight or of the EMA decay."""
    golden = json.loads(GOLDEN.read_text())["runs"]["one_zero0"]
    n, overrides = RUNS["one_zero0"]
    bad = mismatches(golden, record(n, overrides + [override], tmp_path))
    assert any(line.startswith(changed) for line in bad), bad
    if only:
        assert all(line.startswith(changed) for line in bad), bad
