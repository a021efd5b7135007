#!/usr/bin/env bash
# A real single-node Slurm cluster for the slow tests of `bench sweep --executor slurm`: Debian's slurmctld, slurmd
# and munge, no systemd, no cgroups, no accounting daemon, everything private to one directory.
#
#   tests/slurm/cluster.sh install        apt-get install the packages (root; about 15-35 s)
#   tests/slurm/cluster.sh start DIR      write DIR/slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   tests/slurm/cluster.sh stop DIR       cancel every job, then stop slurmd, slurmctld and munged
#   tests/slurm/cluster.sh env DIR        print the environment a client needs (SLURM_CONF, PATH with the shim)
#
# Private means: its own munge socket and key, its own config (clients find it through SLURM_CONF), ports, spool,
# state and log files under DIR, so it never meets a system Slurm or another developer's test cluster.
#
# Accounting: submitit reads job states with `sacct`, which needs slurmdbd. Instead of a database, the tests put
# tests/slurm/bin first on PATH: its `sacct` is a TEST SHIM that answers submitit's one query from `scontrol show
# job` (the controller keeps finished jobs for MinJobAge seconds). Everything else (sbatch, srun, scontrol, scancel,
# squeue, requeue) is the real Slurm.
#
# Timing knobs, so that the tests take seconds rather than minutes:
#   cred_expire=10       a requeued job may start again 11 s after its requeue (default 120 s + 1)
#   KillWait=2           SIGKILL 2 s after SIGTERM on cancel or time limit (default 30 s; submitit ignores SIGTERM)
#   sched_interval=1     the main scheduler runs every second (default 60 s), plus backfill every 5 s
#   MinJobAge=3600       finished jobs stay visible to scontrol (and so to the sacct shim) for an hour
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
packages=(slurmctld slurmd slurm-client munge)

die() { echo "cluster.sh: $*" >&2; exit 1; }

cmd_install() {
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "slurm packages already installed"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root (apt-get)"
    command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent or stale on a fresh machine.
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && \
        apt-get install -y -q "${missing[@]}" >/dev/null; }
    echo "installed ${missing[*]}"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cmd_env() {
    local dir="$1"
    echo "export SLURM_CONF=$dir/slurm.conf"
    echo "export PATH=$here/bin:\$PATH"
}

cmd_start() {
    local dir="$1"
    for exe in munged slurmctld slurmd sbatch scontrol; do
        command -v "$exe" >/dev/null || die "$exe not found: run '$0 install' first"
    done
    [ "$(id -u)" -eq 0 ] || die "the test cluster runs its daemons as root and munged as the munge user"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    runuser -u munge -- test -x "$dir" || die "the munge user cannot enter $dir (or a folder above it): use a \
folder such as one made by mktemp -d, with chmod 755"
    # munged insists that its key, socket and log live in a directory only the munge user can write.
    chown munge:munge "$dir/munge"
    chmod 711 "$dir/munge"  # others may reach the socket (execute), not list or write
    [ -f "$dir/munge/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$dir/munge/munge.key"
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

    local host ctld_port slurmd_port cpus mem_mb
    host="$(hostname -s)"
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    cpus=2
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))  # jobs may ask for --mem
    cat >"$dir/slurm.conf" <<EOF
# speechbench test cluster (tests/slurm/cluster.sh): one node, no systemd, no cgroups, no accounting.
ClusterName=speechbench-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=5,sched_min_interval=0
MinJobAge=3600
KillWait=2
InactiveLimit=0
OverTimeLimit=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
PreemptType=preempt/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N "$host"
    for _ in $(seq 1 100); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
            echo "slurm test cluster up: SLURM_CONF=$SLURM_CONF, node $host, $cpus CPUs"
            return 0
        fi
        sleep 0.2
    done
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    die "the node did not become idle within 20 s (logs above)"
}

stop_pidfile() {
    local pidfile="$1" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    local dir="$1"
    [ -f "$dir/slurm.conf" ] || { echo "no test cluster in $dir"; return 0; }
    export SLURM_CONF="$dir/slurm.conf"
    # Cancel jobs while slurmd still runs, so their processes are killed rather than left orphaned.
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    echo "slurm test cluster in $dir stopped"
}

case "${1:-}" in
    install) cmd_install ;;
    start) [ $# -eq 2 ] || die "usage: $0 start DIR"; cmd_start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; cmd_stop "$2" ;;
    env) [ $# -eq 2 ] || die "usage: $0 env DIR"; cmd_env "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR | env DIR" ;;
esac
