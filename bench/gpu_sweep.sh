#!/usr/bin/env bash
# The full sweep on a lent GPU through the product's own path: python tune_sweep.py, 24 trials x 25 epochs,
# the seed's hyper-parameters (search_space.yaml), resources: auto (single-rank trials packed on the GPU),
# train.compile: auto (one CUDA graph per step). bench/README.md has the exact run-tool calls.
#
#   OUT=DIR bash bench/gpu_sweep.sh            # DEADLINE=480 (s) by default; continues a stopped sweep
#
# Needs, carried with the tree (git-ignored): .gpu/ray (bash ../shared/tools/device-ray-bundle.sh .gpu/ray)
# and .gpu/mnist/MNIST/raw/*.gz. The sweep lives in .gpu/runs (kept on the machine while it stays warm), so
# a second call resumes it with --resume. At DEADLINE the sweep gets SIGINT (Tune saves its state and
# stops; every finished epoch is already checkpointed) and the report is rebuilt from the records.
# Brought back in $OUT (the run tool returns at most 8 files): results.json, results.csv, tables.md,
# accuracy_vs_bits.png, learning_curves.png, timing.md (bench/sweep_timing.py), README.md with the tables
# (complete sweeps only) and extras.tar.gz: records/, sweep_config.json, timing.json, gpu_usage.csv (nvidia-smi every 5 s), logs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-/tmp/apot-gpu-sweep}
deadline=${DEADLINE:-480}
storage=.gpu/runs
experiment=$storage/apot_mnist
mkdir -p "$out"
t0=$(date +%s)
# shellcheck source=/dev/null
source .gpu/ray/install.sh || { echo "FATAL: Ray bundle did not import"; exit 3; }
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
extras=$(mktemp -d)
read -ra extra_args <<< "${APOT_SWEEP_ARGS:-}"  # e.g. APOT_SWEEP_ARGS="--set train.compile=compile"
resume=()
[ -f "$experiment/sweep_config.json" ] && resume=(--resume)
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > "$extras/gpu_usage.csv" &
smi=$!
echo "setup $(( $(date +%s) - t0 )) s; sweep ${resume[*]:-new}, deadline ${deadline} s"
s0=$(date +%s)
timeout --signal=INT --kill-after=45 "$deadline" \
  python3 tune_sweep.py --data-dir .gpu/mnist --storage "$storage" --display plain --update-readme \
  "${resume[@]}" "${extra_args[@]}" > "$extras/sweep.log" 2>&1
rc=$?
wall=$(( $(date +%s) - s0 ))
kill "$smi" 2>/dev/null
echo "tune_sweep.py exit $rc after $wall s"
tail -n 40 "$extras/sweep.log"
if [ "$rc" -ne 0 ]; then  # stopped or failed: rebuild the results files from the records (not the README)
  python3 tune_sweep.py --report-only --data-dir .gpu/mnist --storage "$storage" > "$extras/report.log" 2>&1
fi
for f in results.json results.csv tables.md accuracy_vs_bits.png learning_curves.png; do
  [ -f "$experiment/$f" ] && cp "$experiment/$f" "$out/"
done
[ -f "$experiment/sweep_config.json" ] && cp "$experiment/sweep_config.json" "$extras/"
[ -d "$experiment/records" ] && cp -r "$experiment/records" "$extras/"
[ "$rc" -eq 0 ] && cp README.md "$out/README.md"
total_wall=$(( $(cat "$storage/wall_s" 2>/dev/null || echo 0) + wall ))  # all calls of this sweep
echo "$total_wall" > "$storage/wall_s"
python3 bench/sweep_timing.py "$experiment" --wall "$total_wall" --json "$extras/timing.json" > "$out/timing.md"
cat "$out/timing.md"
tar -C "$extras" -czf "$out/extras.tar.gz" .
echo "total $(( $(date +%s) - t0 )) s"
exit "$rc"
