#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the CUDA extension, run the whole test suite on the GPU, and run the
# benchmarks with CUDA events and torch.cuda.max_memory_allocated, writing bench/results/gpu-<stamp>.{md,json}
# and gpu.log. Usage (from the repository root):  bash bench/gpu.sh [--quick]
# Needs: a CUDA torch already installed (pip install torch), nvcc matching torch.version.cuda (CUDA_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
out="bench/results"
mkdir -p "$out"
log="$out/gpu.log"
: > "$log"
python - <<'PY' | tee -a "$log"
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PY
echo "== build (CUDA extension)" | tee -a "$log"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-8}" \
  python setup.py build_ext --inplace 2>&1 | tail -3 | tee -a "$log"
python -c "import dbprop, sys; i = dbprop.backend_info(); print(i); sys.exit(0 if i.get('cuda') else 'CUDA extension missing')" \
  | tee -a "$log"
echo "== tests (the CUDA tests run instead of skipping)" | tee -a "$log"
PYTHONPATH=. python -m pytest -q 2>&1 | tail -5 | tee -a "$log"
echo "== benchmarks on cuda (CUDA events, max_memory_allocated; each contender also in a fresh process)" | tee -a "$log"
PYTHONPATH=. python bench/run.py --device cuda --out "$out/gpu" "$@" 2>&1 | tee -a "$log"
echo "results: $out/gpu/ ; log: $log"
