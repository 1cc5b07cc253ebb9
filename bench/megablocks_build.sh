#!/usr/bin/env bash
# Build and install the `megablocks` expert backend on a GPU machine WITHOUT network, from the sources
# bench/megablocks_fetch.sh put in .gpu/megablocks/ (carry `.gpu`). Installs into /tmp/site, where
# .gpu/gpu-wheels/install.sh puts the other GPU-machine packages; run Python with PYTHONPATH=/tmp/site.
#
#   bash bench/megablocks_build.sh [gg|mb|all]       (default all = gg, mb, install, check)
#
#   gg  grouped_gemm 0.3.0 wheel: CUDA extension grouped_gemm_backend, built with GROUPED_GEMM_CUTLASS=1
#       (one CUTLASS grouped-GEMM kernel per call; =0 gives upstream's default, a host loop of cuBLAS GEMMs)
#   mb  megablocks 0.10.0 wheel: CUDA extension megablocks_ops (cub), its sdist patched for CUDA 13
#       (csrc/cumsum.h passes CUB's removed `debug_synchronous` argument: databricks/megablocks#180)
#   then install both + stanford-stk (pure Python) with --no-deps, and print megablocks_available().
#
# Time: the gg and mb steps ran end to end on a 2-core CPU host with the GPU image's toolchain (nvcc
# 13.0.88, torch 2.11.0+cu130 from PyPI, Python 3.11, CUDA_HOME = the pip CUDA 13.0 packages): gg 273 s,
# mb 145 s, ~7 min in all; the installed extensions imported and megablocks_available() was True. The
# GPU machine compiles the same files (grouped_gemm's two in parallel, megablocks' one: more cores barely
# help), so expect <= 7 min: one 10-minute device command. Measured on the H100: 2 min 51 s for both. Each step skips when its wheel exists, in
# .gpu/megablocks/built/ (prebuilt wheels you brought back) or in $MEGABLOCKS_WHEELS (default
# /tmp/megablocks-wheels: survives only while the machine stays warm). If a command hits the limit,
# run `... megablocks_build.sh gg` and `... megablocks_build.sh` as two commands. With $OUT set the
# wheels and build logs are copied there, so they come back: put the wheels into .gpu/megablocks/built/
# and later runs install them without compiling (same image: torch 2.11 cu130, Python 3.12).
set -euo pipefail
step=${1:-all}
case $step in gg|mb|all) ;; *) echo "usage: $0 [gg|mb|all]" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$repo/.gpu/megablocks
wheels=${MEGABLOCKS_WHEELS:-/tmp/megablocks-wheels}
site=${MEGABLOCKS_SITE:-/tmp/site}
logs=${OUT:-/tmp}
py=${PYTHON:-python3}
mkdir -p "$wheels" "$site"
# ninja (parallel compile) and the interpreter's tools on PATH
PATH="$(dirname "$($py -c 'import sys; print(sys.executable)')"):$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # no device query in setup.py; sm_90 only
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export GROUPED_GEMM_CUTLASS=${GROUPED_GEMM_CUTLASS:-1}
for f in megablocks-0.10.0.tar.gz grouped_gemm-0.3.0.tar.gz; do
  [ -f "$src/$f" ] || { echo "error: $src/$f missing: run bench/megablocks_fetch.sh where pip works," \
    "and carry .gpu" >&2; exit 1; }
done
ls "$src"/stanford_stk-0.7.1-*.whl >/dev/null || { echo "error: no stanford_stk wheel in $src" >&2; exit 1; }
$py - <<'EOF'
import shutil, torch
from torch.utils.cpp_extension import CUDA_HOME
print(f"torch {torch.__version__}, CUDA_HOME {CUDA_HOME}, nvcc {shutil.which('nvcc')}, ninja {shutil.which('ninja')}")
assert CUDA_HOME, "CUDA_HOME not found: megablocks would silently skip its CUDA extension"
EOF
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS GROUPED_GEMM_CUTLASS=$GROUPED_GEMM_CUTLASS"

have() {  # have NAME -> path of an already built wheel, if any (prebuilt ones first)
  local f
  for f in "$src"/built/"$1"-*.whl "$wheels"/"$1"-*.whl; do
    if [ -f "$f" ]; then echo "$f"; return 0; fi
  done
  return 0
}

build() {  # build NAME SOURCE: one wheel, log to $logs/megablocks_build_NAME.log
  local name=$1 source=$2 log=$logs/megablocks_build_$1.log t0=$SECONDS
  if [ -n "$(have "$name")" ]; then echo "$name: have $(have "$name")"; return; fi
  echo "$name: building (log: $log)"
  if ! $py -m pip wheel -v --no-index --no-deps --no-build-isolation --no-cache-dir -w "$wheels" "$source" \
      >"$log" 2>&1; then
    grep -E "error|Error" "$log" | tail -n 30 || true
    tail -n 40 "$log"
    echo "$name: build FAILED after $((SECONDS - t0)) s" >&2
    exit 1
  fi
  echo "$name: built in $((SECONDS - t0)) s: $(have "$name")"
  if [ -n "${OUT:-}" ]; then cp "$(have "$name")" "$OUT"/; fi
}

if [ "$step" = gg ] || [ "$step" = all ]; then
  build grouped_gemm "$src/grouped_gemm-0.3.0.tar.gz"
fi

if [ "$step" = mb ] || [ "$step" = all ]; then
  if [ -z "$(have megablocks)" ]; then
    tree=$(mktemp -d /tmp/megablocks-src.XXXXXX)
    tar xzf "$src/megablocks-0.10.0.tar.gz" -C "$tree"
    $py - "$tree/megablocks-0.10.0/csrc/cumsum.h" <<'EOF'
import re, sys
path = sys.argv[1]
text, n = re.subn(r"stream,\s*debug_synchronous\)\)", "stream))", open(path).read())
assert n == 2, f"expected 2 cub calls with debug_synchronous in {path}, found {n}"
open(path, "w").write(text)
print("megablocks: patched csrc/cumsum.h (CUB without debug_synchronous)")
EOF
    build megablocks "$tree/megablocks-0.10.0"
  else
    echo "megablocks: have $(have megablocks)"
  fi
fi

[ "$step" = all ] || exit 0

$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "$(have grouped_gemm)" "$(have megablocks)" "$src"/stanford_stk-0.7.1-*.whl
echo "installed into $site"
cd "$repo"
PYTHONPATH=$site:$repo${PYTHONPATH:+:$PYTHONPATH} $py - <<'EOF'
import torch
import grouped_gemm, megablocks_ops  # the two CUDA extensions: fail loudly here, not as False below
from megablocks import grouped_gemm_util as gg
from promoe_ds.models.experts import megablocks_available
ok = megablocks_available()
print("megablocks_available():", ok)
if not ok:
    raise SystemExit("error: megablocks_available() is False")
# one grouped GEMM as our backend calls it: w [E, N, K] (nn.Linear layout), sizes on the CPU, an empty group
sizes = torch.tensor([5, 0, 130, 64], dtype=torch.int64)
x = torch.randn(int(sizes.sum()), 64, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4, 96, 64, device="cuda", dtype=torch.bfloat16)
y = gg.ops.gmm(x, w, sizes, trans_b=True)
ref = torch.cat([xs.float() @ w[e].float().t() for e, xs in enumerate(x.split(sizes.tolist()))])
err = float((y.float() - ref).abs().max() / ref.abs().max())
print("gmm", tuple(y.shape), "max rel err vs fp32:", err)
if not err < 2e-2:
    raise SystemExit("error: grouped GEMM result is off")
EOF
