#!/usr/bin/env bash
# Installs and starts a single-node Slurm cluster (slurmctld + slurmd on this machine) for
# the dmqsm Slurm test. Debian/Ubuntu, run as root. Idempotent: when the cluster already
# answers `sinfo` with an idle node, it returns at once.
#
#   sudo deploy/slurm/ci-install.sh          # install (apt) + configure + start
#   DMQSM_SLURM_NO_APT=1 deploy/slurm/ci-install.sh   # configure + start only
#
# Configuration: select/cons_tres, proctrack/linuxproc, task/none, no accounting, one
# partition `debug` holding this host (`hostname -s`) with all its CPUs and memory.
# No systemd needed: the daemons are started directly (works in containers).
set -euo pipefail

log() { echo "[slurm-ci] $*" >&2; }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    running /run/slurmctld.pid && running /run/slurmd.pid || return 1
    local st
    st=$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n1) || return 1
    case "$st" in
        idle*|mixed*|allocated*|completing*) return 0 ;;
        *) return 1 ;;
    esac
}

if node_ready; then
    log "Slurm already up: $(sinfo -h -N -o '%N %T %c CPUs')"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "must run as root to install/start Slurm"; exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    if [ -n "${DMQSM_SLURM_NO_APT:-}" ]; then
        log "slurm-wlm/munge not installed and DMQSM_SLURM_NO_APT is set"; exit 1
    fi
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
# RealMemory in MiB, leave 10% headroom so slurmd never reports less than configured.
MEM=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)
CONF_DIR=/etc/slurm
mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge

# --- munge ---------------------------------------------------------------------------
if ! id munge >/dev/null 2>&1; then useradd -r -s /usr/sbin/nologin munge; fi
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --force --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
fi

# --- slurm.conf ----------------------------------------------------------------------
# Slurm runs as root here (SlurmUser=root): a throw-away single-node test cluster.
NEW_CONF=$(cat <<CONF
# Written by dmqsm deploy/slurm/ci-install.sh: single-node test cluster.
ClusterName=dmqsm-ci
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$NEW_CONF" ]; then
    log "writing $CONF_DIR/slurm.conf (node $HOST, $CPUS CPUs, $MEM MiB)"
    printf '%s\n' "$NEW_CONF" > "$CONF_DIR/slurm.conf"
    RESTART=1
fi
# No cgroup.conf: slurm 22.05 has no "disabled" cgroup plugin; with proctrack/linuxproc
# and task/none it only loads cgroup/v1 without using it.

# --- daemons -------------------------------------------------------------------------
if [ -n "${RESTART:-}" ]; then
    for p in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$p"; then kill "$(cat "$p")" || true; sleep 1; fi
    done
fi
if ! running /run/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || { tail -n 20 /var/log/slurm/slurmctld.log >&2; exit 1; }
fi
if ! running /run/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd || { tail -n 20 /var/log/slurm/slurmd.log >&2; exit 1; }
fi

for i in $(seq 60); do
    if node_ready; then
        log "Slurm up: $(sinfo -h -N -o '%N %T %c CPUs')"
        exit 0
    fi
    # A node left DOWN/DRAINED by an earlier run: resume it.
    if [ "$i" = 5 ] || [ "$i" = 20 ]; then
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
done
log "Slurm did not come up; logs:"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
sinfo -N -l >&2 || true
exit 1
