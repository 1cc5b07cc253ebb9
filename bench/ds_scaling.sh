#!/usr/bin/env bash
# DeepSpeed training throughput of ProMoE-XL on N GPUs of one machine (NCCL, bf16, ZeRO-2, expert
# parallel EP), synthetic latents, fixed per-GPU batch (weak scaling). Prints img/s and img/s per GPU
# (mean over the logged windows after the first).
#   bench/ds_scaling.sh N EP [PER_GPU_BATCH] [STEPS] [PRESET]
set -euo pipefail
N=${1:?number of GPUs}
EP=${2:?ep_size}
B=${3:-32}
STEPS=${4:-30}
PRESET=${5:-ProMoE-XL}
OUT=${OUT_DIR:-runs/bench}/${PRESET}_n${N}_ep${EP}_b${B}
rm -rf "$OUT"
python -m torch.distributed.run --standalone --nproc_per_node "$N" -m promoe_ds.cli train --config configs/promoe_xl.yaml \
  model.preset="$PRESET" data.source=synthetic train.steps="$STEPS" train.global_batch=$((B * N)) \
  train.ep_size="$EP" train.out_dir="$OUT" train.log_every="${LOG_EVERY:-5}" train.ckpt_every=0 train.resume=none \
  wandb.mode=disabled
python - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")][1:]
ips = sum(r["img_per_sec"] for r in rows) / len(rows)
print(f"RESULT {sys.argv[1]}: {ips:.1f} img/s, {ips / rows[0]['world_size']:.1f} img/s per GPU, "
      f"mfu {sum(r.get('mfu', 0) for r in rows) / len(rows):.1%}, loss {rows[-1]['loss']:.4f}")
PY
