"""``train.profile_at``: the trainer profiles a window of steps of a real run (DeepSpeed engine, gloo)
and reports where the time went; the GPU-idle attribution is checked on intervals."""
import gzip
import json
import re

import pytest

from promoe_ds.profiling import PHASES, category, covered, merge_spans

from dist_utils import metrics, run


def test_merge_spans_and_covered():
    busy = merge_spans([(5, 7), (0, 2), (1, 3), (6, 9), (12, 13)])
    assert busy == [(0, 3), (5, 9), (12, 13)]
    assert covered(busy, 2, 12.5) == 1 + 4 + 0.5  # [2,3] + [5,9] + [12,12.5]
    assert covered(busy, 3, 5) == 0 and covered(busy, -10, 100) == 8


def test_kernel_categories():
    assert category("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN") == "GEMM"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert category("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13"
                    "GemmUniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEENS") == "grouped GEMM (experts)"
    assert category("triton_red_fused__to_copy_add_mul_native_layer_norm_backward") == "inductor fused (triton)"
    assert category("Memcpy DtoD (Device -> Device)") == "memcpy / memset"
    assert category("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "NCCL"


@pytest.mark.parametrize("at,n,window", [(2, 2, (2, 3)), (3, 5, (3, 4))])  # second: cut short by the run's end
def test_trainer_profiles_a_window_of_steps(tmp_path, at, n, window):
    out = tmp_path / "run"
    codes = run(1, ["train.global_batch=8", "train.log_every=1", "train.steps=4", "train.ckpt_every=0",
                    "train.ep_size=1", f"train.profile_at={at}", f"train.profile_steps={n}",
                    "train.profile_python=true",
                    f"train.out_dir={out}"], tmp_path / "log")
    assert codes == [0]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # training went on through and after the window
    first, last = window
    assert f"profile of steps {first}-{last}:" in (tmp_path / "log/rank0.log").read_text()
    report = (out / "profile/rank0.txt").read_text()
    head = re.match(rf"steps {first}-{last} on cpu: wall ([\d.]+) ms/step\n", report)
    assert head, report[:200]
    host = {m[1]: float(m[2]) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \|$", report, re.M)}
    assert set(host) == set(PHASES) and all(host[p] > 0 for p in ("forward", "backward", "optimizer"))
    assert sum(host.values()) <= float(head[1]) * 1.05  # per-step means of disjoint parts of the step
    # Python stacks: DeepSpeed's own functions are named with their host time
    assert re.search(r"^ +[\d.]+ +.*deepspeed/runtime/engine\.py\(\d+\): backward$", report, re.M), report
    trace = json.load(gzip.open(out / "profile/rank0.trace.json.gz"))
    annotations = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    assert annotations.count("backward") == annotations.count("optimizer") == last - first + 1
