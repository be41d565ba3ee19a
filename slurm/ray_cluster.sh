#!/usr/bin/env bash
# The APoT sweep on a Ray cluster made of this Slurm job's nodes: Ray head on the first node, a Ray worker
# on each other node, tune_sweep.py as the driver on the first node, everything stopped when it ends.
#
#   sbatch slurm/ray_cluster.sh [tune_sweep.py options]     # e.g. sbatch slurm/ray_cluster.sh --quick
#
# Submit from the repository root with the Python environment active (sbatch passes PATH on): python and
# ray come from PATH. Edit the #SBATCH lines below for your cluster; everything else has a default:
#   APOT_STORAGE          results and checkpoints, on a filesystem every node sees
#                         (default: $SLURM_SUBMIT_DIR/ray_results); given to tune_sweep.py as --storage
#   APOT_CPUS_PER_NODE    CPUs Ray offers per node (default: $SLURM_CPUS_ON_NODE)
#   APOT_GPUS_PER_NODE    GPUs Ray offers per node (default: from Slurm's GPU variables, else 0)
#   APOT_CLUSTER_TIMEOUT_S  how long the cluster may take to form (default 300)
#   APOT_STOP_TIMEOUT_S   how long the driver may take to stop after SIGTERM (default 120): keep it under
#                         the --signal lead time below, with a minute to spare for the teardown
#   APOT_SWEEP_ENTRY      the driver script (default tune_sweep.py; the tests use a stand-in)
# Nodes are assumed alike: the CPU/GPU counts of the first node are given to every node.
#
# A requeued or resubmitted job continues the same sweep: --resume is added when the sweep's folder
# (<storage>/<name>, resolved from the same options and config as tune_sweep.py resolves it) exists.
# Time limit: Slurm sends SIGUSR1 to this script --signal's seconds before the limit; the sweep then stops
# at its last checkpoints (SIGTERM to tune_sweep.py: tables written), Ray is torn down, and the job
# requeues itself (scontrol requeue), to continue where it stopped once Slurm starts it again.
# The cluster uses token authentication with a fresh token per job, ports picked free by the OS (the head's
# address is read from its own private temp dir) and a private temp dir per node made with mktemp, so jobs
# sharing a node neither collide nor can attach to, or impersonate, each other.
#
#SBATCH --job-name=apot-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
##SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=apot-sweep-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

log() { echo "[$(date +%H:%M:%S)] ray_cluster: $*"; }
die() { log "error: $*" >&2; exit 1; }

# Total GPUs in a Slurm GPU spec: "4", "a100:4", "gpu:a100:4", "gres/gpu:2", "gpu:2(IDX:0-1)",
# comma lists of those ("gpu:a100:2,gpu:v100:1"); items of other gres (e.g. "mps:100") are ignored when
# the spec is a gres list ($2 = gres). Prints nothing when no count can be read.
count_gpu_spec() {
    local spec=$1 kind=${2:-gpus} item total="" count
    local -a items fields
    IFS=, read -ra items <<<"$spec"
    for item in "${items[@]}"; do
        item=${item%%(*}
        item=${item#gres/}
        item=${item#gres:}
        [[ -n $item ]] || continue
        IFS=: read -ra fields <<<"$item"
        if [[ ${fields[0]} == gpu ]]; then
            fields=("${fields[@]:1}")
        elif [[ $kind == gres ]]; then
            continue
        fi
        count=1
        if ((${#fields[@]} > 0)) && [[ ${fields[-1]} =~ ^[0-9]+$ ]]; then
            count=${fields[-1]}
        fi
        total=$((${total:-0} + count))
    done
    [[ -z $total ]] || echo "$total"
}

# Entries in a GPU index list such as SLURM_JOB_GPUS: "0,1,2,3", "0-3", "0,2-3".
count_index_list() {
    local item total=0
    local -a items
    IFS=, read -ra items <<<"$1"
    for item in "${items[@]}"; do
        if [[ $item =~ ^([0-9]+)-([0-9]+)$ ]]; then
            total=$((total + BASH_REMATCH[2] - BASH_REMATCH[1] + 1))
        elif [[ $item =~ ^[0-9]+$ ]]; then
            total=$((total + 1))
        fi
    done
    echo "$total"
}

# GPUs per node for `ray start --num-gpus`: APOT_GPUS_PER_NODE, else what Slurm allocated on this node.
# SLURM_GPUS_ON_NODE can be empty (e.g. GPUs requested with --gres), so fall back through the other forms.
gpus_per_node() {
    local n
    if [[ -n ${APOT_GPUS_PER_NODE:-} ]]; then
        echo "$APOT_GPUS_PER_NODE"
    elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif n=$(count_gpu_spec "${SLURM_GPUS_PER_NODE:-}") && [[ -n $n ]]; then
        echo "$n"
    elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then
        count_index_list "$SLURM_JOB_GPUS"
    elif n=$(count_gpu_spec "${SLURM_JOB_GRES:-${SLURM_TRES_PER_NODE:-}}" gres) && [[ -n $n ]]; then
        echo "$n"
    else
        echo 0
    fi
}

# A TCP port free on this node now (for the Ray client server: a squatter could only make the head fail).
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# The address Slurm itself uses for a node (NodeAddr), as an IPv4 address.
node_ip() {
    local addr ip
    addr=$(scontrol show node "$1" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    [[ -n $addr ]] || addr=$1
    ip=$(getent ahostsv4 "$addr" | awk '{print $1; exit}')
    echo "${ip:-$addr}"
}

# The folder tune_sweep.py will write, resolved exactly as it resolves it (config file, --quick,
# --set name=..., --storage), so a requeued job resumes the same sweep.
experiment_dir() {
    "$PYTHON" - "$@" <<'PY'
import sys
from pathlib import Path

from apot.config import load_config
from tune_sweep import parse_args

args = parse_args(sys.argv[1:])
cfg = load_config(args.config, overrides=args.overrides, quick=args.quick, storage=args.storage,
                  data_dir=args.data_dir)
print(Path(cfg.storage).resolve() / cfg.name)
PY
}

# A fresh private folder /tmp/ray-<job>-XXXXXX (mktemp: a name no one can predict, made by this call, mode
# 0700); refuses anything that is not a directory of this user's with mode 0700 and no link. Prints its path.
# Ray's temp dir goes inside it (<dir>/r): Ray makes its own temp dir world-writable, and its Unix sockets
# and the head's address file live there. Kept short: Unix socket paths must stay under 107 bytes.
private_tmp_dir() {
    local dir
    dir=$(mktemp -d "${1:-/tmp}/ray-${SLURM_JOB_ID:-x}-XXXXXX") || return 1
    check_private_dir "$dir" || return 1
    echo "$dir"
}

# Exit 1, with one line on stderr, unless $1 is a real directory (not a link) owned by this user, mode 0700.
check_private_dir() {
    local dir=$1 owner mode
    if [[ -L $dir || ! -d $dir ]]; then
        echo "ray_cluster: error: $dir is a link or not a directory; refusing it as a Ray temp dir" >&2
        return 1
    fi
    read -r owner mode < <(stat -c '%u %a' "$dir")
    if [[ $owner != "$(id -u)" || $mode != 700 ]]; then
        echo "ray_cluster: error: $dir is owned by uid $owner with mode $mode, not by $(id -u) with 700;" \
            "refusing it as a Ray temp dir" >&2
        return 1
    fi
}

# The functions a job step on another node needs (it runs a fresh bash there).
STEP_FUNCTIONS=$(declare -f private_tmp_dir check_private_dir)

# Start `ray start ... --block` as a background job step on one node, with Ray's temp dir in $1/r, where
# $1 is a private folder of the head node (made here) or "new" (a worker: the step makes its own on its node).
# The dashboard is off and so is metrics export (an unauthenticated endpoint on all interfaces); every port
# is picked free by the OS (the GCS port included: --port=0 on the head).
start_node() {
    local dir=$1 node=$2
    shift 2
    # shellcheck disable=SC2016  # $1 and $@ belong to the inner bash
    RAY_enable_metrics_collection=0 srun --nodes=1 --ntasks=1 -w "$node" --overlap bash -c '
        eval "$1"
        dir=$2
        if [[ $dir == new ]]; then
            dir=$(private_tmp_dir) || exit 1
            echo "[$(date +%H:%M:%S)] ray_cluster: node $SLURMD_NODENAME: Ray temp dir $dir/r"
        fi
        shift 2
        exec "$@" --temp-dir="$dir/r"' _ "$STEP_FUNCTIONS" "$dir" \
        ray start --num-cpus="$CPUS" --num-gpus="$GPUS" \
        --min-worker-port=0 --max-worker-port=0 --dashboard-agent-listen-port=0 \
        --disable-usage-stats --block "$@" &
    STEP_PIDS+=($!)
    STEP_NODES+=("$node")
}

# Index of a background step that has exited, or nothing.
dead_step() {
    local i
    for i in "${!STEP_PIDS[@]}"; do
        if ! kill -0 "${STEP_PIDS[i]}" 2>/dev/null; then
            echo "$i"
            return
        fi
    done
}

fail_if_step_died() {
    local i
    i=$(dead_step)
    if [[ -n $i ]]; then
        wait "${STEP_PIDS[i]}"
        die "ray on node ${STEP_NODES[i]} exited (status $?) before the cluster formed; see its output above"
    fi
}

# The head's GCS address, from the file `ray start` writes into its own temp dir once the head is up. That
# dir is inside a private folder of this user's, so the address is this job's head and no one else's (a port
# derived from the job id could be bound first by anyone on the node, who would then get every node's token).
wait_for_head() {
    local deadline=$1 file=$HEAD_TMP/r/ray_current_cluster
    until [[ -s $file ]]; do
        fail_if_step_died
        ((SECONDS < deadline)) || die "the Ray head on $HEAD_NODE did not start within ${CLUSTER_TIMEOUT_S} s"
        sleep 1
    done
    RAY_ADDRESS=$(<"$file")
    [[ $RAY_ADDRESS =~ ^[0-9.]+:[0-9]+$ ]] || die "unexpected head address '$RAY_ADDRESS' in $file"
    export RAY_ADDRESS
}

wait_for_nodes() {
    local deadline=$1 want=$2
    "$PYTHON" - "$RAY_ADDRESS" "$want" <<'PY' &
import os
import signal
import sys
import time

import ray

address, want = sys.argv[1], int(sys.argv[2])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # not Ray's crash handler: stopped on purpose
last = -1
while (alive := sum(node["Alive"] for node in ray.nodes())) < want:
    if alive != last:
        print(time.strftime("[%H:%M:%S]"), f"ray_cluster: {alive}/{want} Ray nodes joined", flush=True)
        last = alive
    time.sleep(1)
PY
    POLLER_PID=$!
    while kill -0 "$POLLER_PID" 2>/dev/null; do
        if [[ -n $(dead_step) ]]; then
            fail_if_step_died
        fi
        if ((SECONDS >= deadline)); then
            die "not all $want nodes joined the Ray cluster within ${CLUSTER_TIMEOUT_S} s"
        fi
        sleep 1
    done
    wait "$POLLER_PID" || die "could not count the nodes of the Ray cluster at $RAY_ADDRESS"
    POLLER_PID=
}

# Wait until the given PIDs have exited or $1 seconds have passed; the ones left go to LEFT.
wait_pids() {
    local deadline=$((SECONDS + $1)) pid
    shift
    while :; do
        LEFT=()
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && LEFT+=("$pid"); done
        ((${#LEFT[@]} == 0 || SECONDS >= deadline)) && return
        sleep 0.5
    done
}

# USR1 trap: Slurm's warning that the time limit is near (#SBATCH --signal). Stop and requeue in teardown.
on_time_limit() {
    log "time limit near (SIGUSR1): stopping the sweep at its last checkpoints, then requeueing the job"
    REQUEUE=1
    exit 143
}

# EXIT trap: stop the driver (SIGTERM: it stops its trials and writes the tables), then Ray on every node,
# then the srun steps; keep the sweep's exit code. After a time-limit warning, requeue the job unless the
# sweep had finished.
teardown() {
    local rc=$? i status driver_rc=${DRIVER_RC:-}
    local -a early=()
    trap '' TERM INT USR1
    [[ -z ${POLLER_PID:-} ]] || kill "$POLLER_PID" 2>/dev/null
    if [[ -n ${DRIVER_PID:-} ]]; then
        if kill -0 "$DRIVER_PID" 2>/dev/null; then
            log "stopping the sweep driver (it writes the tables; up to $STOP_TIMEOUT_S s)"
            kill -TERM "$DRIVER_PID" 2>/dev/null
            wait_pids "$STOP_TIMEOUT_S" "$DRIVER_PID"
            ((${#LEFT[@]} == 0)) || { log "the driver did not stop in time; killing it"; kill -KILL "$DRIVER_PID"; }
        fi
        wait "$DRIVER_PID" 2>/dev/null
        driver_rc=$?
    fi
    [[ -z $driver_rc ]] || log "sweep exited with code $driver_rc"
    if ((${#STEP_PIDS[@]} > 0)); then
        for i in "${!STEP_PIDS[@]}"; do
            kill -0 "${STEP_PIDS[i]}" 2>/dev/null || early+=("$i")
        done
        log "stopping Ray on ${STEP_NODES[*]} (Slurm reports these steps as CANCELLED: expected)"
        # SIGTERM to every job step (not this batch script): `ray start --block` then stops its node's Ray
        # processes and exits. `ray stop` is not used: it kills every Ray on the host, other jobs' too.
        scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
        wait_pids 30 "${STEP_PIDS[@]}"
        if ((${#LEFT[@]} > 0)); then
            log "Ray steps still running after 30 s; killing them"
            kill -TERM "${LEFT[@]}" 2>/dev/null  # srun then kills its step with SIGKILL
            wait_pids 15 "${LEFT[@]}"
            ((${#LEFT[@]} == 0)) || log "error: srun ${LEFT[*]} did not exit"
        fi
        for i in "${early[@]}"; do
            wait "${STEP_PIDS[i]}" 2>/dev/null
            status=$?
            log "warning: ray on ${STEP_NODES[i]} had exited (status $status) before the sweep ended"
        done
        if ((${#early[@]} == ${#STEP_PIDS[@]} && rc == 0)); then
            log "error: Ray had exited on every node before the sweep ended"
            rc=1
        fi
    fi
    if ((${REQUEUE:-0})) && [[ $driver_rc != 0 ]]; then
        log "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))): it resumes the sweep"
        scontrol requeue "$SLURM_JOB_ID" || log "error: scontrol requeue failed; resubmit the same command"
    fi
    log "done, exit code $rc"
    exit "$rc"
}

main() {
    set -uo pipefail
    [[ -n ${SLURM_JOB_ID:-} ]] || die "submit this script with sbatch"
    command -v ray >/dev/null || die "ray is not on PATH: activate the environment before sbatch"
    cd "$SLURM_SUBMIT_DIR" || die "cannot enter $SLURM_SUBMIT_DIR"

    PYTHON=${APOT_PYTHON:-python}
    SWEEP_ENTRY=${APOT_SWEEP_ENTRY:-tune_sweep.py}
    STORAGE=${APOT_STORAGE:-$SLURM_SUBMIT_DIR/ray_results}
    CLUSTER_TIMEOUT_S=${APOT_CLUSTER_TIMEOUT_S:-300}
    STOP_TIMEOUT_S=${APOT_STOP_TIMEOUT_S:-120}
    CPUS=${APOT_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}
    [[ -n $CPUS ]] || die "SLURM_CPUS_ON_NODE is not set: set APOT_CPUS_PER_NODE"
    GPUS=$(gpus_per_node)
    STEP_PIDS=()
    STEP_NODES=()
    # From here on every exit tears down; a time-limit warning (USR1, whose default action would kill this
    # script) requeues the job whenever it comes.
    trap teardown EXIT
    trap 'log "got SIGTERM"; exit 143' TERM
    trap 'log "got SIGINT"; exit 130' INT
    trap on_time_limit USR1
    [[ -f $SWEEP_ENTRY ]] || die "$SWEEP_ENTRY not found in $SLURM_SUBMIT_DIR (submit from the repository root)"
    mkdir -p "$STORAGE" || die "cannot create the storage folder $STORAGE"

    local -a nodes sweep_args
    # The head runs on the node this script runs on (Slurm's batch host, the first node), so that its
    # address can be read from its private temp dir here.
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    HEAD_NODE=${SLURMD_NODENAME:-${nodes[0]}}
    local -a workers=()
    for i in "${!nodes[@]}"; do [[ ${nodes[i]} == "$HEAD_NODE" ]] || workers+=("${nodes[i]}"); done
    nodes=("$HEAD_NODE" "${workers[@]}")
    HEAD_IP=$(node_ip "$HEAD_NODE")
    HEAD_TMP=$(private_tmp_dir) || die "cannot make a private temp dir in /tmp"

    sweep_args=(--storage "$STORAGE" "$@")
    if [[ $(basename "$SWEEP_ENTRY") == tune_sweep.py ]]; then
        local experiment
        experiment=$(experiment_dir "${sweep_args[@]}") || die "cannot read the sweep's config (see above)"
        if [[ -d $experiment ]]; then
            log "the sweep folder $experiment exists: resuming it"
            sweep_args+=(--resume)
        fi
    fi

    # A fresh token per job, handed to every node and the driver through the environment (srun passes it
    # on; other users cannot read a process's environment). Never printed.
    RAY_AUTH_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))') || die "no token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
    # On SIGTERM, stop at once instead of draining (draining only helps serving workloads).
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

    log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${#nodes[@]} node(s) (${nodes[*]}), $CPUS CPUs and $GPUS GPUs each; head $HEAD_NODE, Ray temp dir $HEAD_TMP/r"
    local deadline=$((SECONDS + CLUSTER_TIMEOUT_S)) i
    local -a head_args=(--head --node-ip-address="$HEAD_IP" --port=0 --include-dashboard=false)
    # The Ray client server (default port 10001, the same for every job) only starts when ray[client]
    # (grpcio) is installed; the sweep does not use it, but Ray will not take 0 (off) for its port.
    if "$PYTHON" -c 'import grpc' 2>/dev/null; then
        head_args+=(--ray-client-server-port="$(free_port)")
    fi
    start_node "$HEAD_TMP" "$HEAD_NODE" "${head_args[@]}"
    wait_for_head "$deadline"
    log "Ray head at $RAY_ADDRESS"
    for ((i = 1; i < ${#nodes[@]}; i++)); do
        start_node new "${nodes[i]}" --address="$RAY_ADDRESS" --node-ip-address="$(node_ip "${nodes[i]}")"
    done
    wait_for_nodes "$deadline" "${#nodes[@]}"
    log "Ray cluster up: ${#nodes[@]} nodes; storage $STORAGE"

    sweep_args=(--address "$RAY_ADDRESS" "${sweep_args[@]}")
    log "running: $PYTHON $SWEEP_ENTRY ${sweep_args[*]}"
    "$PYTHON" "$SWEEP_ENTRY" "${sweep_args[@]}" &
    DRIVER_PID=$!
    # A trapped signal (USR1) cuts `wait` short; the trap then exits and teardown collects the driver.
    wait "$DRIVER_PID"
    DRIVER_RC=$?
    DRIVER_PID=
    exit "$DRIVER_RC"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
