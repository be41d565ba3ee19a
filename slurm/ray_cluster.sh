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
#   APOT_SWEEP_ENTRY      the driver script (default tune_sweep.py; the tests use a stand-in)
# Nodes are assumed alike: the CPU/GPU counts of the first node are given to every node.
#
# A requeued or resubmitted job continues the same sweep: --resume is added when the sweep's folder
# (<storage>/<name>, resolved from the same options and config as tune_sweep.py resolves it) exists.
# The cluster uses token authentication with a fresh token per job, ports derived from the job id and a
# private per-job temp dir per node, so jobs sharing a node neither collide nor can attach to each other.
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

# Start `ray start ... --block` as a background job step on one node. Its temp dir sits in a per-job
# parent only this user can enter (Ray makes its own temp dir world-writable; Unix sockets live there).
start_node() {
    local index=$1 node=$2
    shift 2
    local tmp=$RAY_TMP_PARENT/$index
    # shellcheck disable=SC2016  # $1 and $@ belong to the inner bash
    srun --nodes=1 --ntasks=1 -w "$node" --overlap \
        bash -c 'install -d -m 0700 "$1" && shift && exec "$@"' _ "$RAY_TMP_PARENT" \
        ray start --temp-dir="$tmp" --num-cpus="$CPUS" --num-gpus="$GPUS" \
        --min-worker-port=0 --max-worker-port=0 \
        --dashboard-agent-listen-port=$((PORT_BASE + 3 + index % 13)) \
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

wait_for_head() {
    local deadline=$1
    # shellcheck disable=SC2016  # $1 and $2 belong to the inner bash
    until timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$HEAD_IP" "$GCS_PORT" 2>/dev/null; do
        fail_if_step_died
        ((SECONDS < deadline)) || die "the Ray head on $HEAD_NODE did not answer within ${CLUSTER_TIMEOUT_S} s"
        sleep 1
    done
}

wait_for_nodes() {
    local deadline=$1 want=$2
    "$PYTHON" - "$RAY_ADDRESS" "$want" <<'PY' &
import sys
import time

import ray

address, want = sys.argv[1], int(sys.argv[2])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
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

# EXIT trap: stop the driver, then Ray on every node, then the srun steps; keep the sweep's exit code.
teardown() {
    local rc=$? i status
    local -a early=()
    trap '' TERM INT
    [[ -z ${POLLER_PID:-} ]] || kill "$POLLER_PID" 2>/dev/null
    if [[ -n ${DRIVER_PID:-} ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        log "stopping the sweep driver"
        kill -TERM "$DRIVER_PID" 2>/dev/null
        wait_pids 20 "$DRIVER_PID"
        ((${#LEFT[@]} == 0)) || kill -KILL "$DRIVER_PID" 2>/dev/null
    fi
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
    CPUS=${APOT_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}
    [[ -n $CPUS ]] || die "SLURM_CPUS_ON_NODE is not set: set APOT_CPUS_PER_NODE"
    GPUS=$(gpus_per_node)
    # Ports from the job id: GCS, dashboard, Ray client, dashboard agents (one per node of a host);
    # 16 ports per job in 20000-32767, below Linux's ephemeral range. All other ports are picked free.
    PORT_BASE=$((20000 + SLURM_JOB_ID % 798 * 16))
    GCS_PORT=$PORT_BASE
    RAY_TMP_PARENT=/tmp/ray-$SLURM_JOB_ID  # short: Unix socket paths must stay under 107 bytes
    STEP_PIDS=()
    STEP_NODES=()
    [[ -f $SWEEP_ENTRY ]] || die "$SWEEP_ENTRY not found in $SLURM_SUBMIT_DIR (submit from the repository root)"
    mkdir -p "$STORAGE" || die "cannot create the storage folder $STORAGE"

    local -a nodes sweep_args
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    HEAD_NODE=${nodes[0]}
    HEAD_IP=$(node_ip "$HEAD_NODE")
    RAY_ADDRESS=$HEAD_IP:$GCS_PORT
    export RAY_ADDRESS

    sweep_args=(--address "$RAY_ADDRESS" --storage "$STORAGE" "$@")
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

    trap teardown EXIT
    trap 'log "got SIGTERM"; exit 143' TERM
    trap 'log "got SIGINT"; exit 130' INT

    log "job $SLURM_JOB_ID: ${#nodes[@]} node(s) (${nodes[*]}), $CPUS CPUs and $GPUS GPUs each; head $HEAD_NODE at $RAY_ADDRESS"
    local deadline=$((SECONDS + CLUSTER_TIMEOUT_S)) i
    local -a head_args=(--head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" --dashboard-port=$((PORT_BASE + 1)))
    # The Ray client server (port 10001 by default) only starts when ray[client] (grpcio) is installed.
    if "$PYTHON" -c 'import grpc' 2>/dev/null; then
        head_args+=(--ray-client-server-port=$((PORT_BASE + 2)))
    fi
    start_node 0 "$HEAD_NODE" "${head_args[@]}"
    wait_for_head "$deadline"
    for ((i = 1; i < ${#nodes[@]}; i++)); do
        start_node "$i" "${nodes[i]}" --address="$RAY_ADDRESS" --node-ip-address="$(node_ip "${nodes[i]}")"
    done
    wait_for_nodes "$deadline" "${#nodes[@]}"
    log "Ray cluster up: ${#nodes[@]} nodes; storage $STORAGE"

    log "running: $PYTHON $SWEEP_ENTRY ${sweep_args[*]}"
    "$PYTHON" "$SWEEP_ENTRY" "${sweep_args[@]}" &
    DRIVER_PID=$!
    wait "$DRIVER_PID"
    local rc=$?
    DRIVER_PID=
    log "sweep exited with code $rc"
    exit "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
