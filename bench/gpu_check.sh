#!/usr/bin/env bash
# The GPU check of the trial issue, as one script for a lent GPU machine without Ray:
# ResNet-18 at 5/4/3/2 bits, APoT and uniform, 25 epochs (the seed's hyper-parameters, cosine schedule),
# plus the 4-bit APoT trial under the constant and step schedules (the schedule choice), and ResNet-34/50
# 4-bit APoT for throughput. All concurrent on one GPU, stopped at DEADLINE seconds; results in OUT_DIR.
# Usage: bench/gpu_check.sh DATA_DIR OUT_DIR [DEADLINE]
set -euo pipefail
data=$1 out=$2 deadline=${3:-420}
cd "$(dirname "$0")/.."
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
trials=()
for bit in 5 4 3 2; do
  for q in apot uniform; do
    trials+=(--trial "resnet18_b${bit}_${q}_s0=--arch resnet18 --bit $bit --power $q --epochs 25")
  done
done
for s in constant step; do
  trials+=(--trial "resnet18_b4_apot_s0_${s}=--arch resnet18 --bit 4 --power apot --epochs 25 --schedule $s")
done
for a in resnet34 resnet50; do
  trials+=(--trial "${a}_b4_apot_s0=--arch $a --bit 4 --power apot --epochs 25")
done
PYTHONPATH=. python3 bench/run_direct.py --out "$out" --data-dir "$data" --deadline "$deadline" "${trials[@]}"
