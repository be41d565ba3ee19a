#!/usr/bin/env bash
# The full sweep on a GPU machine through the product's own path, python tune_sweep.py: the 27 trials of
# search_space.yaml (3 archs x (FP32 + 4 bit widths x APoT and uniform)) x 25 epochs, resources: auto
# (single-rank trials packed on the GPUs), train.compile: auto (one CUDA graph per step).
#
#   bash bench/gpu_sweep.sh OUT DEADLINE_S [tune_sweep.py flags ...]
#
# OUT: a folder for the results, written while the sweep runs: sweep.log (the sweep's output as it prints;
#   appended to by each call),
#   records/ (each trial's record, copied every few seconds: a run cut short still returns every finished
#   trial), gpu_usage.csv (nvidia-smi every 5 s); at the end results.json, results.csv, tables.md, the two
#   PNGs, sweep_config.json and timing.md (bench/sweep_timing.py).
# DEADLINE_S: seconds after which the sweep is stopped with SIGTERM, the sweep's graceful stop (every trial
#   stops at its last checkpoint, the tables are written, exit 143). Allow about a minute more for the stop
#   itself; a second SIGTERM follows after STOP_GRACE_S (default 90) if it has not exited by then.
# Run it again with the same storage to continue: --resume is added when the sweep already exists there.
# Environment: APOT_DATA_DIR (the MNIST root; or pass --data-dir), PYTHON (default python3). Flags go to
# tune_sweep.py as they are (default storage: runs/gpu), e.g. --set train.compile=compile.
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: bash bench/gpu_sweep.sh OUT DEADLINE_S [tune_sweep.py flags ...]" >&2; exit 2; }
out=$1 deadline=$2
shift 2
[[ "$deadline" =~ ^[0-9]+$ ]] || { echo "gpu_sweep.sh: DEADLINE_S must be whole seconds, got '$deadline'" >&2; exit 2; }
grace=${STOP_GRACE_S:-90}
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=bench/gpu_lib.sh
source bench/gpu_lib.sh
flags=(--storage runs/gpu --display plain "$@")  # a --storage among "$@" comes later and wins
experiment=$(experiment_path "${flags[@]}") || exit 2
mkdir -p "$out/records" || exit 2
resume=()
[ -f "$experiment/sweep_config.json" ] && resume=(--resume)
echo "sweep: $experiment (${resume[*]:-new}), stopped after $deadline s; results in $out"

smi=
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > "$out/gpu_usage.csv" &
  smi=$!
fi
copy_records() {  # new or changed records only
  [ -d "$experiment/records" ] && cp -u "$experiment"/records/*.json "$out/records/" 2> /dev/null
  return 0
}

t0=$(date +%s)
"$py" tune_sweep.py "${flags[@]}" "${resume[@]}" > >(tee -a "$out/sweep.log") 2>&1 &
sweep=$!
stopped_at=
while kill -0 "$sweep" 2> /dev/null; do
  sleep 2
  copy_records
  now=$(date +%s)
  if [ -z "$stopped_at" ] && [ $(( now - t0 )) -ge "$deadline" ]; then
    echo "gpu_sweep.sh: deadline ($deadline s): SIGTERM, the sweep stops at its last checkpoints"
    kill -TERM "$sweep" 2> /dev/null
    stopped_at=$now
  elif [ -n "$stopped_at" ] && [ $(( now - stopped_at )) -ge "$grace" ]; then
    echo "gpu_sweep.sh: not stopped after $grace s: SIGTERM again (exits at once; records are on disk)"
    kill -TERM "$sweep" 2> /dev/null
    stopped_at=$(( now + 100000 ))  # once
  fi
done
wait "$sweep"
rc=$?
wall=$(( $(date +%s) - t0 ))
[ -n "$smi" ] && kill "$smi" 2> /dev/null
echo "gpu_sweep.sh: tune_sweep.py exit $rc after $wall s"

copy_records
for f in results.json results.csv tables.md accuracy_vs_bits.png learning_curves.png sweep_config.json; do
  [ -f "$experiment/$f" ] && cp "$experiment/$f" "$out/"
done
total=$(( $(cat "$experiment/gpu_sweep_wall_s" 2> /dev/null || echo 0) + wall ))  # every call of this sweep
[ -d "$experiment" ] && echo "$total" > "$experiment/gpu_sweep_wall_s"
if [ -d "$experiment/records" ]; then
  "$py" bench/sweep_timing.py "$experiment" --wall "$total" > "$out/timing.md" && cat "$out/timing.md"
fi
exit "$rc"
