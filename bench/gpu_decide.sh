#!/usr/bin/env bash
# The decision call on a lent GPU (at most 4 minutes; bench/README.md has the exact run-tool call).
# Checks what the full-sweep call (bench/gpu_sweep.sh) relies on, and measures what it decides with:
#   1. the Ray bundle unpacks and imports on that machine (Python 3.12, torch 2.11, no Ray, no pip index);
#   2. MNIST from .gpu/mnist (.gz) parses; tune_sweep.py --dry-run shows the resolved resources there;
#   3. ResNet-18 4-bit (APoT, uniform) and FP32: eager vs compiled vs CUDA-graph step, in one process,
#      with compile seconds and the largest loss difference to eager (bench/bench_step.py --modes).
#      Its compiles land in the sweep's compile cache, so the sweep's ResNet-18 trials load them.
# Everything it prints also goes to $OUT (the run tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-/tmp/apot-gpu-decide}
mkdir -p "$out"
exec > >(tee "$out/decide.log") 2>&1
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# shellcheck source=/dev/null
source .gpu/ray/install.sh || { echo "FATAL: Ray bundle did not import"; exit 3; }
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m apot.data check --data-dir .gpu/mnist || exit 4
python3 tune_sweep.py --dry-run --data-dir .gpu/mnist --storage .gpu/runs | tail -n 6
echo "setup took $(( $(date +%s) - t0 )) s"
cache=$PWD/.gpu/runs/apot_mnist/compile_cache   # the sweep's shared cache (apot.step.use_compile_cache)
mkdir -p "$cache" && chmod 700 "$cache"
TORCHINDUCTOR_CACHE_DIR=$cache TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=1 \
  timeout 170 python3 bench/bench_step.py --device cuda --modes eager compile cudagraph --bits 4 \
  --archs resnet18 --steps 30 --warmup 5
echo "rc $? after $(( $(date +%s) - t0 )) s"
