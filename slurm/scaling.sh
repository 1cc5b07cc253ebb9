#!/bin/bash
# Weak-scaling study: submit the same model at 1, 2, 4, 8... nodes with a FIXED per-GPU batch
# (global_batch = PER_GPU_BATCH x total GPUs), each in its own run directory, then a small job
# that runs `promoe-ds scaling-report` on all of them once they are done.
#
#   CONFIG=configs/promoe_xl.yaml slurm/scaling.sh                 # 1 2 4 8 nodes x 8 GPUs
#   NODES_LIST="1 2 4 8 16" PER_GPU_BATCH=32 STEPS=300 SBATCH_ARGS="--partition=gpu" slurm/scaling.sh
#   DRY_RUN=1 slurm/scaling.sh                                     # print the sbatch commands only
#
# Result: $RUN_ROOT/report.{md,csv,png} (img/s, per-GPU img/s, efficiency vs the smallest run).
# Every run is a short benchmark (STEPS steps, no resume; an earlier study's checkpoints and metrics in
# the same run directory are moved aside by train.overwrite), so keep STEPS
# a few times log_every: the report skips the first logged interval(s) as warm-up.
set -euo pipefail

# ============================================================================= edit here
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
NODES_LIST=${NODES_LIST:-1 2 4 8}          # node counts to run
GPUS_PER_NODE=${GPUS_PER_NODE:-8}          # tasks (GPUs) per node
PER_GPU_BATCH=${PER_GPU_BATCH:-32}         # images per GPU per step (kept fixed: weak scaling)
STEPS=${STEPS:-300}
LOG_EVERY=${LOG_EVERY:-25}
EP_SIZE=${EP_SIZE:-}                       # empty: the config's train.ep_size (must divide GPUS_PER_NODE)
OVERRIDES=${OVERRIDES:-}                   # more key=value overrides for every run
RUN_ROOT=${RUN_ROOT:-runs/scaling/$(basename "${CONFIG%.*}")-$(date +%Y%m%d-%H%M%S)}
TIME_LIMIT=${TIME_LIMIT:-01:00:00}
DEVICE=${DEVICE:-auto}                     # cpu: no GPUs requested (CPU-only test clusters)
SBATCH_ARGS=${SBATCH_ARGS:-}               # e.g. "--partition=gpu --account=me"
REPORT_JOB=${REPORT_JOB:-1}                # 1: submit the report job (afterany the runs)
REPORT_SBATCH_ARGS=${REPORT_SBATCH_ARGS:-} # e.g. "--partition=cpu"
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-}                         # for the report job; the runs use train.sbatch's default
# =============================================================================

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "${here}/.." && pwd)
cd "${root}"
read -r -a sbatch_args <<< "${SBATCH_ARGS}"
read -r -a report_args <<< "${REPORT_SBATCH_ARGS}"
gpu_flag=(--gpus-per-node="${GPUS_PER_NODE}")
if [[ "${DEVICE}" == cpu ]]; then gpu_flag=(--gpus-per-node=0 --cpus-per-task=1); fi

submit() {  # prints the job id (or the command, with DRY_RUN=1)
    if [[ "${DRY_RUN}" == 1 ]]; then
        {
            printf 'DRY_RUN:'
            if [[ -n "${RUN_DIR:-}" ]]; then printf ' %s=%q' CONFIG "${CONFIG}" RUN_DIR "${RUN_DIR}" OVERRIDES "${OVERRIDES}"; fi
            printf ' sbatch'; printf ' %q' "$@"; printf '\n'
        } >&2
        echo "DRY"
    else
        sbatch --parsable "$@" | cut -d';' -f1
    fi
}

if [[ "${DRY_RUN}" != 1 ]]; then mkdir -p "${RUN_ROOT}"; fi
run_dirs=()
job_ids=()
for nodes in ${NODES_LIST}; do
    gpus=$((nodes * GPUS_PER_NODE))
    run_dir="${RUN_ROOT}/n${nodes}"
    overrides="train.global_batch=$((PER_GPU_BATCH * gpus)) train.steps=${STEPS}"
    overrides+=" train.log_every=${LOG_EVERY} train.ckpt_every=${STEPS} train.resume=none train.overwrite=true"
    if [[ -n "${EP_SIZE}" ]]; then overrides+=" train.ep_size=${EP_SIZE}"; fi
    if [[ -n "${OVERRIDES}" ]]; then overrides+=" ${OVERRIDES}"; fi
    # The job reads CONFIG / RUN_DIR / OVERRIDES / DEVICE from the environment (sbatch --export=ALL).
    id=$(CONFIG="${CONFIG}" RUN_DIR="${run_dir}" OVERRIDES="${overrides}" DEVICE="${DEVICE}" \
        submit --job-name="scale-n${nodes}" --nodes="${nodes}" --ntasks-per-node="${GPUS_PER_NODE}" \
        "${gpu_flag[@]}" --time="${TIME_LIMIT}" --no-requeue "${sbatch_args[@]}" "${here}/train.sbatch")
    echo "n${nodes}: ${nodes} node(s) x ${GPUS_PER_NODE} = ${gpus} GPUs, global batch $((PER_GPU_BATCH * gpus)) -> ${run_dir} (job ${id})"
    run_dirs+=("${run_dir}")
    job_ids+=("${id}")
done

report_cmd=(promoe-ds scaling-report "${run_dirs[@]}" --out "${RUN_ROOT}/report")
if [[ "${REPORT_JOB}" == 1 && "${DRY_RUN}" != 1 ]]; then
    python=${PYTHON:-}
    if [[ -z "${python}" ]]; then
        if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
    fi
    deps=$(IFS=:; echo "${job_ids[*]}")
    id=$(submit --job-name=scale-report --dependency="afterany:${deps}" --nodes=1 --ntasks=1 --cpus-per-task=1 \
        --time=00:10:00 --output="${RUN_ROOT}/report-%j.out" "${report_args[@]}" \
        --wrap="$(printf '%q ' "${python}" -m promoe_ds.cli scaling-report "${run_dirs[@]}" --out "${RUN_ROOT}/report")")
    echo "report job ${id} (after ${deps}): ${RUN_ROOT}/report.{md,csv,png}"
else
    echo "when the runs are done: ${report_cmd[*]}"
fi
