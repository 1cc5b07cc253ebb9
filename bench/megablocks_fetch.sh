#!/usr/bin/env bash
# Fetch, on a CPU machine with network, what bench/megablocks_build.sh needs to build the `megablocks`
# expert backend on a GPU machine without network. Writes .gpu/megablocks/ (git-ignored, carried):
#   megablocks-0.10.0.tar.gz     sdist; its CUDA extension megablocks_ops is built on the GPU machine
#   grouped_gemm-0.3.0.tar.gz    sdist; CUDA extension grouped_gemm_backend (CUTLASS headers inside)
#   stanford_stk-0.7.1-*.whl     pure Python (triton kernels), built into a wheel here
# The GPU machines' image already has torch 2.11, triton, numpy, packaging, setuptools, wheel, ninja.
# Usage: bash bench/megablocks_fetch.sh      (idempotent; prints the size of .gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu/megablocks
py=${PYTHON:-python3}
mkdir -p "$dest"

# The sdists come straight from PyPI's simple index (PEP 691 JSON, the index pip reads), checked
# against pinned sha256s. `pip download --no-binary :all:` cannot fetch them on a CPU machine: it
# prepares their metadata, i.e. runs setup.py, which imports torch and (grouped_gemm) builds a
# CUDAExtension, or first installs their build requirements (torch==2.7.0) from source.
"$py" - "$dest" <<'EOF'
import hashlib, json, os, sys, urllib.request

dest = sys.argv[1]
want = {  # project -> (file, sha256)
    "megablocks": ("megablocks-0.10.0.tar.gz",
                   "956fd9880fa869f7468da125da230733d5f84e10a9f8c2991e5e16523c6fe1e0"),
    "grouped-gemm": ("grouped_gemm-0.3.0.tar.gz",
                     "f0555da33a975610e9160f52449082c5e699525524581a0e5f990b14b02676a3"),
}
for project, (name, sha) in want.items():
    path = os.path.join(dest, name)
    if os.path.exists(path) and hashlib.sha256(open(path, "rb").read()).hexdigest() == sha:
        print(f"have {name}")
        continue
    req = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = {f["filename"]: f for f in json.load(urllib.request.urlopen(req, timeout=60))["files"]}
    if name not in files:
        sys.exit(f"error: {name} is not on PyPI's index for {project}")
    data = urllib.request.urlopen(files[name]["url"], timeout=300).read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        sys.exit(f"error: {name}: sha256 {got}, expected {sha}")
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    print(f"got  {name} ({len(data)} bytes)")
EOF

# stanford-stk ships only an sdist whose setup.py is plain setuptools: build the wheel here.
if ! ls "$dest"/stanford_stk-0.7.1-*.whl >/dev/null 2>&1; then
  "$py" -m pip wheel -q --no-deps --no-cache-dir -w "$dest" stanford-stk==0.7.1
fi

ls -l "$dest"
du -sh "$dest" .gpu
mib=$(du -sm .gpu | cut -f1)
if [ "$mib" -gt 60 ]; then
  echo "warning: .gpu is ${mib} MiB (keep it under ~60 MiB: the carried tree is capped at 64 MiB)" >&2
fi
