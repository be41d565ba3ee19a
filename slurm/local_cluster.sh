#!/usr/bin/env bash
# A real two-node Slurm on this one host, for the tests and CI (Debian/Ubuntu, as root, no systemd needed).
#
#   slurm/local_cluster.sh install   # apt-get install slurm-wlm munge, if missing
#   slurm/local_cluster.sh start     # munged + slurmctld + two slurmd (nodes n1, n2); waits until both idle
#   slurm/local_cluster.sh status    # exit 0 when everything is up
#   slurm/local_cluster.sh stop      # cancel jobs, stop the daemons by their PIDs, remove the state
#   eval "$(slurm/local_cluster.sh env)"   # then sbatch/srun/squeue/sinfo talk to this cluster
#
# Everything lives in $APOT_SLURM_DIR (default /tmp/apot-slurm): slurm.conf, PID files, spool, state, logs.
# As the daemons run as root from it, it must be a root-owned directory of mode 0700, not a link: start
# makes it so when it is absent, and every command refuses one that is not (another user could have made it).
# /etc/slurm is not touched; clients find the cluster through SLURM_CONF. The two nodes are two slurmd's
# on 127.0.0.1 (Debian builds Slurm with multiple-slurmd support), each with $APOT_SLURM_CPUS CPUs
# (default: all cores of the host; the nodes share them). start and stop are idempotent.
set -euo pipefail

STATE=${APOT_SLURM_DIR:-/tmp/apot-slurm}
CONF=$STATE/slurm.conf
CPUS=${APOT_SLURM_CPUS:-$(nproc)}
CTLD_PORT=${APOT_SLURM_PORT:-16817}
NODES=(n1 n2)
NODE_PORTS=(17001 17002)
START_TIMEOUT_S=60
STOP_TIMEOUT_S=60
HOST=$(hostname -s)

log() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

# A zombie (killed, not yet reaped) counts as dead.
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1") != Z* ]]; }
pid_of() { if [[ -s $1 ]]; then cat "$1"; fi; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed"
        return
    fi
    [[ $EUID -eq 0 ]] || die "installing needs root"
    log "installing slurm-wlm munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    mkdir -p "$STATE"/{log,ctld,spool}
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: two slurmd's on one host.
ClusterName=apot-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=30
# A job past its time limit gets a minute more before the kill: room for ray_cluster.sh's stop and requeue.
OverTimeLimit=1
MinJobAge=600
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=$CPUS State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

# Exit with one line unless $STATE is absent (start may create it) or a root-owned 0700 directory, no link.
check_state_dir() {
    [[ -e $STATE || -L $STATE ]] || return 0
    if [[ -L $STATE || ! -d $STATE ]]; then
        die "$STATE is a link or not a directory; remove it (or set APOT_SLURM_DIR) and run again"
    fi
    local owner mode
    read -r owner mode < <(stat -c '%u %a' "$STATE")
    if [[ $owner != 0 || $mode != 700 ]]; then
        die "$STATE is owned by uid $owner with mode $mode, not by root with 700; remove it (or set APOT_SLURM_DIR) and run again"
    fi
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create >/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged  # daemonizes; writes /run/munge/munged.pid
    local deadline=$((SECONDS + 20))
    until munge_works; do
        ((SECONDS < deadline)) || die "munged did not answer within 20 s"
        sleep 0.2
    done
    # Only a munged started here is stopped by 'stop'.
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

daemons_alive() {
    alive "$(pid_of "$STATE/slurmctld.pid")" || return 1
    local node
    for node in "${NODES[@]}"; do
        alive "$(pid_of "$STATE/slurmd-$node.pid")" || return 1
    done
}

nodes_idle() {
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
    [[ $states == "${NODES[0]} idle"$'\n'"${NODES[1]} idle" ]]
}

start() {
    [[ $EUID -eq 0 ]] || die "start needs root (the daemons run as root)"
    command -v slurmctld >/dev/null || die "Slurm is not installed: run '$0 install' first"
    if [[ -f $CONF ]] && daemons_alive; then
        log "already running ($CONF)"
        return
    fi
    [[ -d $STATE ]] || install -d -m 0700 "$STATE"
    check_state_dir
    if ! alive "$(pid_of "$STATE/slurmctld.pid")"; then
        # A fresh cluster every time: no jobs recovered from an earlier run that was not stopped cleanly.
        rm -rf "$STATE/ctld" "$STATE/spool"
    fi
    write_conf
    start_munge
    alive "$(pid_of "$STATE/slurmctld.pid")" || slurmctld -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        alive "$(pid_of "$STATE/slurmd-$node.pid")" || slurmd -f "$CONF" -N "$node"
    done
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until daemons_alive && nodes_idle; do
        if ((SECONDS >= deadline)); then
            SLURM_CONF=$CONF sinfo -N 2>&1 || true
            tail -n 20 "$STATE"/log/*.log >&2 || true
            die "the nodes did not become idle within ${START_TIMEOUT_S} s (logs in $STATE/log)"
        fi
        sleep 0.5
    done
    log "up: nodes ${NODES[*]} idle, $CPUS CPUs each; export SLURM_CONF=$CONF"
}

# Send TERM to a PID from a PID file, wait for it to exit, then KILL it.
stop_pidfile() {
    local pid
    pid=$(pid_of "$1")
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$pid"; then
        log "$(basename "$1" .pid) ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

stop() {
    [[ -d $STATE ]] || { log "not running"; return; }
    if [[ -f $CONF ]] && alive "$(pid_of "$STATE/slurmctld.pid")"; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086  # one job id per word
            SLURM_CONF=$CONF scancel $jobs || true
            local deadline=$((SECONDS + STOP_TIMEOUT_S))
            while [[ -n $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    local node
    for node in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$node.pid"; done
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munged.pid"
    # Keep the logs for a post-mortem; everything else goes.
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +
    log "stopped (logs kept in $STATE/log)"
}

status() {
    local rc=0 name pid
    for name in slurmctld "${NODES[@]/#/slurmd-}"; do
        pid=$(pid_of "$STATE/$name.pid")
        if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; rc=1; fi
    done
    if munge_works; then echo "munge: ok"; else echo "munge: not answering"; rc=1; fi
    if ((rc == 0)); then
        SLURM_CONF=$CONF sinfo -N -o '%N %T %c' || rc=1
        nodes_idle || SLURM_CONF=$CONF squeue || true
    fi
    return "$rc"
}

case ${1:-} in
    install) install_packages ;;
    start) check_state_dir && start ;;
    stop) check_state_dir && stop ;;
    status) check_state_dir && status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
