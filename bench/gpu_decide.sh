#!/usr/bin/env bash
# Before the full sweep on a GPU machine (bench/gpu_sweep.sh): check what it relies on and measure what it
# decides with, printing each result as soon as it is there.
#
#   bash bench/gpu_decide.sh OUT [LIMIT_S]
#
#   1. the GPU, Python, torch and Ray the sweep will use; MNIST parses (APOT_DATA_DIR, or --data-dir);
#   2. tune_sweep.py --dry-run: the resources auto resolves to and the step mode of each trial;
#   3. ResNet-18 4-bit (APoT, uniform) and FP32 steps, eager, then compiled, then replayed as a CUDA graph,
#      each in its own run of bench/bench_step.py (at most LIMIT_S seconds each, default 170): ms/step,
#      compile seconds and the largest loss difference to the eager step. The compiles land in the sweep's
#      compile cache (its default storage, runs/gpu), so the sweep's ResNet-18 trials load them.
# BENCH_FLAGS (optional) go to bench_step.py after the defaults, e.g. BENCH_FLAGS="--steps 60".
# OUT/decide.log holds everything printed. Without CUDA the steps run on the CPU and the CUDA-graph run is
# skipped (a dry run of this script).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_decide.sh OUT [LIMIT_S]" >&2; exit 2; }
out=$1 limit=${2:-170}
[[ "$limit" =~ ^[0-9]+$ ]] || { echo "gpu_decide.sh: LIMIT_S must be whole seconds, got '$limit'" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=bench/gpu_lib.sh
source bench/gpu_lib.sh
mkdir -p "$out" || exit 2
exec > >(tee "$out/decide.log") 2>&1
t0=$(date +%s)
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" -c "import sys, torch, ray; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.cuda.is_available(), '| ray', ray.__version__, 'from', ray.__file__)" || exit 3
"$py" -m apot.data check ${APOT_DATA_DIR:+--data-dir "$APOT_DATA_DIR"} || exit 4
plan=$("$py" tune_sweep.py --dry-run --storage runs/gpu) || exit 2
grep -E '^(resources of|trials:)' <<< "$plan"
grep -oE '(cpu|cuda) +step [a-z]+' <<< "$plan" | sort | uniq -c | sed 's/$/ (trials)/'
experiment=$(experiment_path --storage runs/gpu) || exit 2
echo "setup took $(( $(date +%s) - t0 )) s"

device=cpu modes=("eager" "eager compile")
if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  device=cuda modes+=("eager cudagraph")
fi
cache=$experiment/compile_cache   # the sweep's shared cache (apot.step.use_compile_cache)
mkdir -p "$cache" && chmod 700 "$cache"
read -ra bench_flags <<< "${BENCH_FLAGS:-}"
for m in "${modes[@]}"; do
  read -ra mode_list <<< "$m"
  echo "== ${mode_list[*]: -1} step on $device (at most $limit s)"
  TORCHINDUCTOR_CACHE_DIR=$cache TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1 \
    TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=1 \
    timeout "$limit" "$py" bench/bench_step.py --device "$device" --modes "${mode_list[@]}" --bits 4 \
    --archs resnet18 resnet50 --steps 30 --warmup 5 "${bench_flags[@]}"
  echo "rc $? after $(( $(date +%s) - t0 )) s"
done
